"""Preprocessing: one study's de-identified copies -> volumes on canonical grids + manifest."""

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from ml.data.preprocess import PreprocessConfig, empty_manifest, preprocess_study
from ml.utils.io import sha256_file
from ml.viz import study_preview_png
from psqa_pipelines.constants import OWNER_DATA, PREPROCESS
from psqa_pipelines.lib.metadata import counts_table, md_png, md_table
from psqa_pipelines.lib.partitions import studies_partitions
from psqa_pipelines.resources import PsqaStorage

# sanity ranges per volume kind: (min allowed, max allowed)
VALUE_RANGES = {
    "ct": (-1200.0, 32767.0),  # HU; extended-range scanners store metal up to ~30000
    "dose": (0.0, 150.0),  # Gy
    "mask": (0.0, 1.0),
    "pdm": (0.0, 1.0),
    "seg": (0.0, 255.0),
    "mr": (-50.0, 50.0),  # z-scores
}


class PreprocessSettings(dg.Config):
    ct_spacing_mm: list[float] | None = Field(
        default=None,
        description="resample CT (and everything on its grid) to this (x, y, z) spacing; null keeps the native grid",
    )
    mr_rigid_registration: bool = Field(
        default=True, description="rigid MI registration of MRI sequences on different grids"
    )


@dg.asset(
    group_name=PREPROCESS,
    partitions_def=studies_partitions,
    kinds={"nifti", "parquet"},
    owners=[OWNER_DATA],
    code_version="1",
    description=(
        "Volumes of one study on canonical LPS grids, written as NIfTI under "
        "`lake/volumes/<study>/` and listed in this manifest (path, shape, spacing, origin, "
        "sha256, grid id): CT in HU, RTSTRUCT ROIs rasterised to masks, RTDOSE resampled to the "
        "CT grid, MRI sequences co-registered and z-scored, OpenKBP arrays."
    ),
    check_specs=[
        dg.AssetCheckSpec(
            "geometry_consistent",
            asset="study_volumes",
            description="every mask/dose/seg shares its reference volume's grid",
        ),
        dg.AssetCheckSpec(
            "values_in_range",
            asset="study_volumes",
            description="no NaN; HU, Gy, mask and z-score values within sane ranges",
        ),
        dg.AssetCheckSpec(
            "files_match_manifest",
            asset="study_volumes",
            description="each file exists and its sha256 equals the manifest's",
        ),
    ],
)
def study_volumes(
    context: dg.AssetExecutionContext,
    config: PreprocessSettings,
    storage: PsqaStorage,
    study_files: pd.DataFrame,
    study_series: pd.DataFrame,
):
    key = context.partition_key
    if study_files.empty:
        yield dg.Output(
            empty_manifest(), metadata={"volumes": 0, "note": "study has no ingested files (all quarantined)"}
        )
        for name in ("geometry_consistent", "values_in_range", "files_match_manifest"):
            yield dg.AssetCheckResult(check_name=name, passed=True, metadata={"volumes": 0})
        return
    source = str(study_files["source"].iloc[0])
    cfg = PreprocessConfig(
        ct_spacing_mm=tuple(config.ct_spacing_mm) if config.ct_spacing_mm else None,
        mr_rigid_registration=config.mr_rigid_registration,
    )
    result = preprocess_study(key, source, study_files, study_series, storage.lake, cfg)
    m = result.manifest
    png = study_preview_png(result.preview, title=key)
    metadata = {
        "source": source,
        "volumes": len(m),
        "kinds": counts_table(m["kind"], "kind"),
        "manifest": md_table(
            m[
                [
                    "volume_key",
                    "kind",
                    "dtype",
                    "shape_z",
                    "shape_y",
                    "shape_x",
                    "spacing_x",
                    "spacing_y",
                    "spacing_z",
                    "vmin",
                    "vmax",
                ]
            ]
        ),
        "preview": md_png(png, f"study {key}"),
    }
    reg = result.preview.get("registration")
    if reg:
        metadata["registration"] = dg.MetadataValue.json(
            {k: {kk: vv for kk, vv in v.items() if kk != "parameters"} for k, v in reg.items()}
        )
    yield dg.Output(m, metadata=metadata)

    # -- checks ------------------------------------------------------------------------
    bad_geo = []
    refs = m.set_index("volume_key")["grid_id"].to_dict()
    for _, row in m.iterrows():
        ref = row["reference_key"]
        if ref in refs and refs[ref] != row["grid_id"]:
            bad_geo.append(row["volume_key"])
    yield dg.AssetCheckResult(
        check_name="geometry_consistent", passed=not bad_geo, metadata={"mismatched": dg.MetadataValue.json(bad_geo)}
    )
    bad_val = []
    for _, row in m.iterrows():
        lo, hi = VALUE_RANGES.get(row["kind"], (-np.inf, np.inf))
        if not np.isfinite(row["vmean"]) or row["vmin"] < lo or row["vmax"] > hi:
            bad_val.append(f"{row['volume_key']}: [{row['vmin']:.4g}, {row['vmax']:.4g}] not in [{lo}, {hi}]")
        if row["kind"] == "ct" and row["vmin"] > -900:
            # a calibrated CT that shows any air has voxels near -1000 HU; no air at all
            # usually means the rescale intercept was not applied
            bad_val.append(f"{row['volume_key']}: no air-like voxels (min {row['vmin']:.4g} HU): rescale not applied?")
    yield dg.AssetCheckResult(
        check_name="values_in_range", passed=not bad_val, metadata={"violations": dg.MetadataValue.json(bad_val)}
    )
    bad_files = [
        row["volume_key"]
        for _, row in m.iterrows()
        if not (storage.lake / row["path"]).exists() or sha256_file(storage.lake / row["path"]) != row["sha256"]
    ]
    yield dg.AssetCheckResult(
        check_name="files_match_manifest", passed=not bad_files, metadata={"bad": dg.MetadataValue.json(bad_files)}
    )
