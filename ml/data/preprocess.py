"""Preprocessing: de-identified study copies -> volumes on canonical grids + a manifest.

Per study, by source:

* **DICOM CT/RT** -- each CT series becomes ``ct.nii.gz`` (int16 HU, canonical LPS grid,
  optionally resampled to ``ct_spacing_mm``); every RTSTRUCT that references it is rasterised
  onto that grid (one ``mask_<ROI>.nii.gz`` per canonical ROI, uint8); every RTDOSE sharing its
  frame of reference is resampled onto it (``dose_<type>.nii.gz``, float32 Gy, linear, 0 outside
  the dose grid).
* **MRI** (DICOM MR series or NIfTI cases) -- sequences co-registered to the reference
  sequence's grid (``ml.data.mri.coregister``) and z-score normalised over the foreground
  (``mr_<seq>.nii.gz``, float32); a label map goes along as ``seg.nii.gz`` (nearest neighbour).
* **OpenKBP** -- the compact array file is put on the canonical grid: ``ct``, ``dose``,
  ``possible_dose_mask`` and one mask per ROI.

Volumes go to ``<lake>/volumes/<study_key>/...`` (deterministic NIfTI, atomic writes); the
return value is the manifest (path, shape, spacing, origin, sha256, grid id, value summary),
never the arrays.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.volume import Volume, resample_spacing, resample_to, to_canonical, write_nifti
from ml.utils.io import sha256_file
from ml.utils.tables import typed_frame

__all__ = ["MANIFEST_COLUMNS", "PreprocessConfig", "StudyVolumes", "empty_manifest", "grid_id", "preprocess_study"]

MANIFEST_COLUMNS = {
    "study_key": "str",
    "source": "str",
    "volume_key": "str",
    "kind": "str",
    "name": "str",
    "path": "str",
    "dtype": "str",
    "shape_z": "int64",
    "shape_y": "int64",
    "shape_x": "int64",
    "spacing_x": "float64",
    "spacing_y": "float64",
    "spacing_z": "float64",
    "origin_x": "float64",
    "origin_y": "float64",
    "origin_z": "float64",
    "direction": "str",
    "grid_id": "str",
    "reference_key": "str",
    "source_object": "str",
    "units": "str",
    "vmin": "float64",
    "vmax": "float64",
    "vmean": "float64",
    "nonzero": "int64",
    "sha256": "str",
}


@dataclass(frozen=True)
class PreprocessConfig:
    ct_spacing_mm: tuple[float, float, float] | None = None  # None: keep the native grid
    mr_rigid_registration: bool = True
    nifti_compresslevel: int = 1


def grid_id(vol: Volume) -> str:
    key = "|".join(
        [
            ",".join(str(n) for n in vol.array.shape),
            ",".join(f"{s:.4f}" for s in vol.spacing),
            ",".join(f"{o:.3f}" for o in vol.origin),
            ",".join(f"{d:.5f}" for d in vol.direction),
        ]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class StudyVolumes:
    manifest: pd.DataFrame
    preview: dict  # arrays for a preview figure: ct slice, masks, dose (small, in memory only)


class _Writer:
    def __init__(self, lake_dir: Path, study_key: str, source: str, cfg: PreprocessConfig) -> None:
        self.lake_dir = lake_dir
        self.root = lake_dir / "volumes" / study_key
        self.study_key = study_key
        self.source = source
        self.cfg = cfg
        self.rows: list[dict] = []
        self.written: set[Path] = set()

    def write(
        self,
        vol: Volume,
        relname: str,
        *,
        kind: str,
        name: str,
        reference_key: str,
        source_object: str,
        units: str = "",
    ) -> Path:
        path = self.root / relname
        write_nifti(vol, path, compresslevel=self.cfg.nifti_compresslevel)
        self.written.add(path)
        arr = vol.array
        self.rows.append(
            {
                "study_key": self.study_key,
                "source": self.source,
                "volume_key": relname.removesuffix(".nii.gz"),
                "kind": kind,
                "name": name,
                "path": path.relative_to(self.lake_dir).as_posix(),
                "dtype": str(arr.dtype),
                "shape_z": arr.shape[0],
                "shape_y": arr.shape[1],
                "shape_x": arr.shape[2],
                "spacing_x": vol.spacing[0],
                "spacing_y": vol.spacing[1],
                "spacing_z": vol.spacing[2],
                "origin_x": vol.origin[0],
                "origin_y": vol.origin[1],
                "origin_z": vol.origin[2],
                "direction": ",".join(f"{d:.6g}" for d in vol.direction),
                "grid_id": grid_id(vol),
                "reference_key": reference_key,
                "source_object": source_object,
                "units": units,
                "vmin": float(arr.min()) if arr.size else 0.0,
                "vmax": float(arr.max()) if arr.size else 0.0,
                "vmean": float(arr.mean(dtype=np.float64)) if arr.size else 0.0,
                "nonzero": int(np.count_nonzero(arr)),
                "sha256": sha256_file(path),
            }
        )
        return path

    def prune(self) -> None:
        if not self.root.exists():
            return
        for p in sorted(self.root.rglob("*"), reverse=True):
            if p.is_file() and p not in self.written:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()

    def frame(self) -> pd.DataFrame:
        return typed_frame(sorted(self.rows, key=lambda r: r["volume_key"]), MANIFEST_COLUMNS)


def empty_manifest() -> pd.DataFrame:
    return typed_frame([], MANIFEST_COLUMNS)


def preprocess_study(
    study_key: str,
    source: str,
    files: pd.DataFrame,
    series: pd.DataFrame,
    lake_dir: str | os.PathLike,
    cfg: PreprocessConfig | None = None,
) -> StudyVolumes:
    cfg = cfg or PreprocessConfig()
    lake_dir = Path(lake_dir)
    w = _Writer(lake_dir, study_key, source, cfg)
    preview: dict = {}
    if source == "dicom":
        _dicom(w, files, series, preview)
    elif source == "nifti":
        _nifti(w, files, preview)
    elif source == "openkbp":
        _openkbp(w, files, preview)
    else:
        raise ValueError(f"unknown source {source!r}")
    w.prune()
    return StudyVolumes(manifest=w.frame(), preview=preview)


def _paths(lake_dir: Path, files: pd.DataFrame, mask) -> list[Path]:
    return [lake_dir / p for p in files.loc[mask, "stored_path"].tolist()]


def _dicom(w: _Writer, files: pd.DataFrame, series: pd.DataFrame, preview: dict) -> None:
    import pydicom

    from ml.data.dicom.headers import quiet_pydicom
    from ml.data.dicom.rtdose import read_dose
    from ml.data.dicom.rtstruct import rasterize_rtstruct
    from ml.data.dicom.series import load_series_volume
    from ml.data.roi_names import CANONICAL

    lake = w.lake_dir
    cts = series[series["modality"] == "CT"].sort_values("series_key")
    for _, ct_row in cts.iterrows():
        skey = ct_row["series_key"]
        vol = load_series_volume(_paths(lake, files, files["series_key"] == skey))
        vol = to_canonical(vol)
        if w.cfg.ct_spacing_mm:
            vol = resample_spacing(vol, w.cfg.ct_spacing_mm, default_value=-1024.0)
        ct = vol.with_array(np.clip(np.rint(vol.array), -32768, 32767).astype(np.int16))
        w.write(
            ct, f"{skey}/ct.nii.gz", kind="ct", name="CT", reference_key=f"{skey}/ct", source_object=skey, units="HU"
        )
        masks: dict[str, np.ndarray] = {}
        structs = series[(series["modality"] == "RTSTRUCT") & (series["referenced_series_key"] == skey)]
        for _, st in structs.sort_values("object_key").iterrows():
            path = _paths(lake, files, files["object_key"] == st["object_key"])[0]
            with quiet_pydicom():
                ds = pydicom.dcmread(path)
            found = rasterize_rtstruct(ds, ct, names=list(CANONICAL))
            for name, mask in sorted(found.items()):
                if name in masks:
                    continue  # first structure set (by key) wins; later ones are duplicates
                masks[name] = mask
                w.write(
                    ct.with_array(mask.astype(np.uint8)),
                    f"{skey}/mask_{name}.nii.gz",
                    kind="mask",
                    name=name,
                    reference_key=f"{skey}/ct",
                    source_object=st["object_key"],
                )
        doses = series[(series["modality"] == "RTDOSE") & (series["referenced_series_key"] == skey)]
        dose_preview = None
        for _, dr in doses.sort_values("object_key").iterrows():
            path = _paths(lake, files, files["object_key"] == dr["object_key"])[0]
            with quiet_pydicom():
                ds = pydicom.dcmread(path)
            dose = read_dose(ds, path)
            on_ct = resample_to(to_canonical(dose), ct, interpolation="linear", default_value=0.0, dtype=np.float32)
            on_ct = on_ct.with_array(np.maximum(on_ct.array, 0).astype(np.float32))
            kind_name = (dose.meta.get("dose_summation_type") or "dose").lower()
            units = "Gy" if dose.meta.get("dose_units", "").upper() == "GY" else dose.meta.get("dose_units", "")
            w.write(
                on_ct,
                f"{skey}/dose_{kind_name}_{dr['object_key']}.nii.gz",
                kind="dose",
                name=kind_name.upper(),
                reference_key=f"{skey}/ct",
                source_object=dr["object_key"],
                units=units,
            )
            if dose_preview is None or kind_name == "plan":
                dose_preview = on_ct.array
        if not preview:
            preview.update({"ct": ct.array, "masks": masks, "dose": dose_preview, "spacing": ct.spacing})
    mrs = series[series["modality"] == "MR"]
    if len(mrs):
        vols = {}
        for seq, grp in mrs.groupby("sequence"):
            if not seq:
                continue
            best = grp.sort_values(["n_slices", "series_key"], ascending=[False, True]).iloc[0]
            vols[seq] = load_series_volume(_paths(lake, files, files["series_key"] == best["series_key"]))
        if vols:
            _write_mri(w, vols, preview, source_object="dicom-mr")


def _nifti(w: _Writer, files: pd.DataFrame, preview: dict) -> None:
    from ml.data.volume import read_nifti

    vols = {row["sequence"]: read_nifti(w.lake_dir / row["stored_path"]) for _, row in files.iterrows()}
    if any(s in vols for s in ("t1", "t1c", "t2", "flair")):
        _write_mri(w, vols, preview, source_object="nifti")


def _write_mri(w: _Writer, vols: dict[str, Volume], preview: dict, source_object: str) -> None:
    from ml.data.mri import coregister, foreground_mask, zscore

    aligned, report = coregister(vols, rigid=w.cfg.mr_rigid_registration)
    ref_name = next(k for k, v in report.items() if v["role"] == "reference")
    brain = foreground_mask(aligned[ref_name].array)
    for seq, vol in sorted(aligned.items()):
        if seq == "seg":
            w.write(
                vol.with_array(vol.array.astype(np.uint8)),
                "seg.nii.gz",
                kind="seg",
                name="seg",
                reference_key=f"mr_{ref_name}",
                source_object=source_object,
            )
            continue
        norm, _mean, _std = zscore(vol.array.astype(np.float32), brain)
        w.write(
            vol.with_array(norm),
            f"mr_{seq}.nii.gz",
            kind="mr",
            name=seq,
            reference_key=f"mr_{ref_name}",
            source_object=source_object,
            units="z-score",
        )
    preview.update(
        {
            "mr": {k: v.array for k, v in aligned.items() if k != "seg"},
            "seg": aligned["seg"].array if "seg" in aligned else None,
            "spacing": aligned[ref_name].spacing,
            "registration": report,
        }
    )


def _openkbp(w: _Writer, files: pd.DataFrame, preview: dict) -> None:
    from ml.data.ingest import unpack_openkbp
    from ml.data.openkbp import canonical_geometry, to_canonical_array

    stored = sorted(set(files["stored_path"]))
    if not stored:
        return
    patient = unpack_openkbp(w.lake_dir / stored[0])
    geom = canonical_geometry(patient.voxel_dimensions)
    skey = files["series_key"].iloc[0]

    def vol(arr):
        return Volume(to_canonical_array(arr), geom["spacing"], geom["origin"])

    ct = vol(patient.ct_hu)
    w.write(ct, f"{skey}/ct.nii.gz", kind="ct", name="CT", reference_key=f"{skey}/ct", source_object=skey, units="HU")
    w.write(
        vol(patient.possible_dose_mask.astype(np.uint8)),
        f"{skey}/possible_dose_mask.nii.gz",
        kind="pdm",
        name="possible_dose_mask",
        reference_key=f"{skey}/ct",
        source_object=skey,
    )
    dose = None
    if patient.dose is not None:
        dose = vol(patient.dose)
        w.write(
            dose,
            f"{skey}/dose_plan.nii.gz",
            kind="dose",
            name="PLAN",
            reference_key=f"{skey}/ct",
            source_object=skey,
            units="Gy",
        )
    masks = {}
    for name, mask in sorted(patient.structures.items()):
        m = vol(mask.astype(np.uint8))
        masks[name] = m.array.astype(bool)
        w.write(m, f"{skey}/mask_{name}.nii.gz", kind="mask", name=name, reference_key=f"{skey}/ct", source_object=skey)
    preview.update(
        {"ct": ct.array, "masks": masks, "dose": dose.array if dose is not None else None, "spacing": ct.spacing}
    )
