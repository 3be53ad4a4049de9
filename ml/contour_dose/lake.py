"""From the preprocessed lake (``volume_manifest``: canonical NIfTI volumes) to contour + dose cases.

Both ingestion paths feed the same models: OpenKBP studies are already on the 128^3
3.906 x 3.906 x 2.5 mm grid and are packed as they are (so scores equal the official ones);
DICOM (CT + RTSTRUCT + RTDOSE) and NIfTI studies are resampled onto that grid by
``cache.arrays_from_volumes`` (128 x 128 in-plane centred on the body, body mask as the
possible-dose mask).

A case is one CT volume with its masks and (optionally) its planned dose; the case id is the
study key (a study with several CT series keeps the first one and reports the others).
Status: ``ok`` (OARs + dose: train/val/test), ``predict_only`` (no dose yet but PTVs: the
product model predicts OARs and dose for it), ``no_dose`` / ``no_oars`` (not usable).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ml.contour_dose.cache import ROI_ORDER, CacheError, arrays_from_volumes, pack_arrays, write_entry, write_index
from ml.utils.io import sha256_bytes

__all__ = ["CASE_COLUMNS", "build_cache", "case_arrays", "cases_from_manifest"]

CASE_COLUMNS = [
    "case_id",
    "study_key",
    "source",
    "ct_path",
    "pdm_path",
    "dose_path",
    "mask_paths",
    "rois",
    "n_oars",
    "has_dose",
    "status",
    "digest",
]


def cases_from_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per study: the CT, pdm, planned dose and ROI masks (paths relative to the lake)."""
    rows = []
    for study, grp in manifest.groupby("study_key", sort=True):
        cts = grp[grp["kind"] == "ct"].sort_values("volume_key")
        if cts.empty:
            continue
        ct = cts.iloc[0]
        ref = ct["reference_key"]
        on_ct = grp[grp["reference_key"] == ref]
        masks = on_ct[(on_ct["kind"] == "mask") & on_ct["name"].isin(ROI_ORDER)].sort_values("name")
        pdm = on_ct[on_ct["kind"] == "pdm"]
        doses = on_ct[on_ct["kind"] == "dose"].copy()
        if len(doses):  # the planned dose first (OpenKBP and RTDOSE PLAN), then by key
            doses["_rank"] = (doses["name"].str.upper() != "PLAN").astype(int)
            doses = doses.sort_values(["_rank", "volume_key"])
        mask_paths = dict(zip(masks["name"], masks["path"], strict=True))
        n_oars = sum(1 for n in mask_paths if not n.startswith("PTV"))
        used = [
            ct,
            *([pdm.iloc[0]] if len(pdm) else []),
            *([doses.iloc[0]] if len(doses) else []),
            *[r for _, r in masks.iterrows()],
        ]
        has_ptv = any(n.startswith("PTV") for n in mask_paths)
        if len(doses):
            status = "ok" if n_oars else "no_oars"
        else:  # a new patient: the product model can still predict from CT + PTVs
            status = "predict_only" if has_ptv else "no_dose"
        if len(cts) > 1:
            status += f";ignored_ct:{len(cts) - 1}"
        rows.append(
            {
                "case_id": str(study),
                "study_key": str(study),
                "source": str(ct["source"]),
                "ct_path": ct["path"],
                "pdm_path": pdm.iloc[0]["path"] if len(pdm) else "",
                "dose_path": doses.iloc[0]["path"] if len(doses) else "",
                "mask_paths": json.dumps(mask_paths, sort_keys=True),
                "rois": ",".join(mask_paths),
                "n_oars": n_oars,
                "has_dose": bool(len(doses)),
                "status": status,
                "digest": sha256_bytes("|".join(sorted(str(r["sha256"]) for r in used)).encode())[:16],
            }
        )
    return pd.DataFrame(rows, columns=CASE_COLUMNS)


def case_arrays(case: pd.Series | dict, lake_dir: str | os.PathLike):
    """Read a case's NIfTI volumes -> (cache arrays, model grid Volume)."""
    import numpy as np

    from ml.data.volume import read_nifti

    lake_dir = Path(lake_dir)
    ct = read_nifti(lake_dir / case["ct_path"])
    masks = {n: read_nifti(lake_dir / p) for n, p in json.loads(case["mask_paths"]).items()}
    dose = read_nifti(lake_dir / case["dose_path"], np.float32) if case["dose_path"] else None
    pdm = read_nifti(lake_dir / case["pdm_path"]) if case["pdm_path"] else None
    on_openkbp_grid = (
        case["source"] == "openkbp"
        and ct.array.shape == (128, 128, 128)
        and np.allclose(ct.spacing, (3.906, 3.906, 2.5), atol=0.05)
    )
    if on_openkbp_grid:
        sx, sy, sz = ct.spacing
        arrays = pack_arrays(
            case["case_id"],
            ct.array.astype(np.int16),
            pdm.array.astype(bool) if pdm is not None else ct.array > -500,
            {n: m.array.astype(bool) for n, m in masks.items()},
            None if dose is None else np.maximum(dose.array, 0),
            (sy, sx, sz),
        )
        arrays["grid_origin"] = np.asarray(ct.origin, dtype=np.float64)
        arrays["grid_spacing"] = np.asarray(ct.spacing, dtype=np.float64)
        return arrays, ct.with_array(np.zeros(ct.array.shape, np.uint8))
    return arrays_from_volumes(case["case_id"], ct, masks, dose, pdm)


def build_cache(
    cases: pd.DataFrame,
    lake_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    split: pd.DataFrame | None = None,
    log=print,
) -> tuple[pd.DataFrame, list[dict]]:
    """(Re)build the cache for every usable case; unchanged cases (same digest) are reused.

    Returns the index (with ``digest``) and the skipped cases with reasons.
    """
    cache_dir = Path(cache_dir)
    previous = pd.DataFrame()
    if (cache_dir / "index.parquet").exists():
        previous = pd.read_parquet(cache_dir / "index.parquet")
    prev = {r["patient_id"]: r for _, r in previous.iterrows()} if len(previous) else {}
    rows, skipped = [], []
    for _, case in cases.iterrows():
        if not case["status"].startswith(("ok", "predict_only")):
            skipped.append({"case_id": case["case_id"], "reason": case["status"]})
            continue
        old = prev.get(case["case_id"])
        if old is not None and old.get("digest") == case["digest"] and (cache_dir / old["file"]).exists():
            rows.append(dict(old))
            continue
        try:
            arrays, _ = case_arrays(case, lake_dir)
            row = write_entry(cache_dir, case["case_id"], arrays)
        except (CacheError, OSError, ValueError) as exc:
            skipped.append({"case_id": case["case_id"], "reason": f"{type(exc).__name__}: {exc}"})
            log(f"skipped {case['case_id']}: {exc}")
            continue
        row.update({"digest": case["digest"], "source": case["source"], "study_key": case["study_key"]})
        rows.append(row)
    keep = {r["file"] for r in rows}
    for f in (cache_dir / "patients").glob("*.npz") if (cache_dir / "patients").exists() else []:
        if f"patients/{f.name}" not in keep:
            f.unlink()  # a case that left the lake leaves the cache
    if not rows:
        raise CacheError(f"no usable contour + dose cases ({len(skipped)} skipped)")
    index = write_index(cache_dir, rows, source="lake", skipped=skipped)
    if split is not None:
        from ml.utils.io import write_parquet_atomic

        s = split[split["patient_id"].isin(index["patient_id"])][["patient_id", "split"]]
        write_parquet_atomic(cache_dir / "split.parquet", s.reset_index(drop=True))
    return index, skipped
