"""Where the synthetic studies' files go: folders and file names (the defaults hold PHI).

H&N study: ``<out>/<Family>_<PatientID>/`` with ``CT/CT.<PatientID>.<instance:04d>.dcm``,
``RTSTRUCT/RS.<PatientID>.dcm`` and ``RTDOSE/RD.<PatientID>.dcm``. MR study:
``<out>/<Family>_<PatientID>_MR/<NN>_<SEQ>/MR.<PatientID>.<seq>.<instance:03d>.dcm``.
"""

from __future__ import annotations

from pathlib import Path

from ml.data.synthetic.planted_phi import PlantedPHI

__all__ = [
    "clear_dcm_files",
    "ct_path",
    "mr_path",
    "mr_series_dir",
    "rtdose_path",
    "rtstruct_path",
    "study_dir",
]


def study_dir(out_dir: str | Path, phi: PlantedPHI, folder_name: str | None = None, suffix: str = "") -> Path:
    """``out_dir / folder_name``, by default ``<Family>_<PatientID><suffix>`` (PHI in the path)."""
    return Path(out_dir) / (folder_name or f"{phi.family_name}_{phi.patient_id}{suffix}")


def clear_dcm_files(d: Path) -> Path:
    """Create ``d`` if needed and remove the ``*.dcm`` files a previous run left in it."""
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob("*.dcm"):
        if p.is_file():
            p.unlink()
    return d


def ct_path(study: Path, phi: PlantedPHI, instance: int) -> Path:
    return study / "CT" / f"CT.{phi.patient_id}.{instance:04d}.dcm"


def rtstruct_path(study: Path, phi: PlantedPHI) -> Path:
    return study / "RTSTRUCT" / f"RS.{phi.patient_id}.dcm"


def rtdose_path(study: Path, phi: PlantedPHI) -> Path:
    return study / "RTDOSE" / f"RD.{phi.patient_id}.dcm"


def mr_series_dir(study: Path, series_number: int, sequence: str) -> Path:
    return study / f"{series_number:02d}_{sequence.upper()}"


def mr_path(series_dir: Path, phi: PlantedPHI, sequence: str, instance: int) -> Path:
    return series_dir / f"MR.{phi.patient_id}.{sequence}.{instance:03d}.dcm"
