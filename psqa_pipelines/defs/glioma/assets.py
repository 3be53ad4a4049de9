"""Glioma data assets: the two read-only sources into the glioma lake, the label table and the
cross-validation folds.

The work is in ``ml.glioma.lake`` (import, de-identification, manifest, export to the training
layout) and ``ml.glioma.split`` (stratified folds); the assets wire storage, de-identification and
metadata around it.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from psqa_pipelines.constants import GLIOMA, OWNER_DATA, OWNER_ML
from psqa_pipelines.lib.metadata import md_png, md_table
from psqa_pipelines.resources import DeidentificationResource, PsqaStorage
from psqa_pipelines.settings import default_brain_mri_dir, default_lgg_dir

common = dict(group_name=GLIOMA, code_version="1")


class GliomaImportSettings(dg.Config):
    lgg_dir: str = Field(
        default_factory=default_lgg_dir,
        description="lgg-mri folder (patients/*.npz + labels.csv; PSQA_LGG_DIR); empty = skip the source",
    )
    brain_mri_dir: str = Field(
        default_factory=default_brain_mri_dir,
        description="brain-mri-samples folder (NIfTI case folders; PSQA_BRAIN_MRI_DIR); empty = skip the source",
    )
    max_patients: int = Field(default=-1, description="lgg-mri: only the first N patients (file order); -1 = all")
    max_brain_cases: int = Field(default=-1, description="brain-mri-samples: only the first N case folders; -1 = all")
    rigid_registration: bool = Field(
        default=True, description="rigid MI registration of sequences that are not on the reference grid"
    )


def _preview(lake: Path, manifest: pd.DataFrame) -> bytes | None:
    """The first case with a tumour mask (else the first case): its sequences on one slice."""
    from ml.data.volume import read_nifti
    from ml.viz import mr_preview_png

    if manifest.empty:
        return None
    with_seg = sorted(manifest.loc[manifest["sequence"] == "seg", "patient_id"])
    pid = with_seg[0] if with_seg else sorted(manifest["patient_id"])[0]
    rows = manifest[manifest["patient_id"] == pid]
    vols = {r["sequence"]: read_nifti(lake / r["path"]).array for r in rows.to_dict("records")}
    seg = vols.pop("seg", None)
    if not vols:
        return None
    return mr_preview_png({k: np.asarray(v, np.float32) for k, v in vols.items()}, seg, title=f"{pid}")


@dg.multi_asset(
    outs={
        "glioma_cases": dg.AssetOut(
            kinds={"nifti", "parquet"},
            owners=[OWNER_DATA],
            description=(
                "The glioma lake's volume manifest: one row per de-identified NIfTI volume under "
                "`lake/glioma/volumes/<patient_id>/<sequence>.nii.gz` (t1, t1c, t2, flair, seg; path, shape, sha256, "
                "layout, spacing_known). Sources: lgg-mri (2D slice stacks, no geometry) and brain-mri-samples "
                "(3D, co-registered; seg binarised to whole tumour). Idempotent: unchanged cases are not rewritten; "
                "bad files go to quarantine (ml.glioma.lake)."
            ),
            **common,
        ),
        "glioma_labels": dg.AssetOut(
            kinds={"parquet"},
            owners=[OWNER_ML],
            description=(
                "One row per glioma case: histology, grade, IDH, 1p/19q as vocabulary strings (null = unknown; "
                "values outside the vocabulary become null with an issue), slice counts and the sequences it lacks. "
                "brain-mri-samples cases are unlabelled (all null)."
            ),
            **common,
        ),
    },
    can_subset=False,
)
def glioma_import(
    context: dg.AssetExecutionContext,
    config: GliomaImportSettings,
    storage: PsqaStorage,
    deid: DeidentificationResource,
):
    from ml.data.phi import table_phi_violations
    from ml.data.quarantine import Quarantine, write_log
    from ml.glioma.lake import import_brain_samples, import_lgg, merge_imports

    storage.ensure_dirs()
    deid.warn_if_dev(context.log)
    pseudonymizer = deid.pseudonymizer()
    quarantine = Quarantine(storage.quarantine)
    parts = []
    if config.lgg_dir and Path(config.lgg_dir).is_dir():
        n = config.max_patients if config.max_patients >= 0 else None
        parts.append(import_lgg(config.lgg_dir, storage.lake, pseudonymizer, quarantine, max_patients=n))
    else:
        context.log.warning("lgg-mri source is off or absent (PSQA_LGG_DIR)")
    if config.brain_mri_dir and Path(config.brain_mri_dir).is_dir():
        n = config.max_brain_cases if config.max_brain_cases >= 0 else None
        parts.append(
            import_brain_samples(
                config.brain_mri_dir,
                storage.lake,
                pseudonymizer,
                quarantine,
                max_cases=n,
                rigid=config.rigid_registration,
            )
        )
    else:
        context.log.warning("brain-mri-samples source is off or absent (PSQA_BRAIN_MRI_DIR)")
    result = merge_imports(*parts)
    write_log(storage.quarantine_log, "glioma", context.run.run_id, result.quarantined)
    for table in (result.manifest, result.labels, result.issues):
        problems = table_phi_violations(table)
        if problems:
            raise RuntimeError(f"glioma tables would store PHI: {problems}")
    manifest, labels = result.manifest, result.labels
    counts = (
        manifest.groupby(["source", "sequence"]).size().unstack(fill_value=0).reset_index()
        if len(manifest)
        else pd.DataFrame()
    )
    context.add_output_metadata(
        {
            "patients": int(manifest["patient_id"].nunique()) if len(manifest) else 0,
            "volumes": len(manifest),
            "quarantined": len(result.quarantined),
            "volumes_by_source_and_sequence": md_table(counts),
            "quarantine_reasons": md_table(
                pd.DataFrame([{"reason": r.reason, "detail": r.detail} for r in result.quarantined])
            ),
            "preview": md_png(_preview(storage.lake, manifest), "glioma case"),
            "lake_dir": dg.MetadataValue.path(str(storage.lake / "glioma")),
        },
        output_name="glioma_cases",
    )
    label_counts = pd.DataFrame(
        [
            {"task": t, "value": v if isinstance(v, str) else "unknown", "patients": int(n)}
            for t in ("histology", "grade", "idh", "codel")
            for v, n in labels[t].value_counts(dropna=False).sort_index().items()
        ]
    )
    for it in result.issues.to_dict("records"):
        context.log.warning(f"glioma label issue: {it['patient_id']} {it['reason']}: {it['detail']} ({it['action']})")
    context.add_output_metadata(
        {
            "patients": len(labels),
            "labelled": int(labels[["histology", "grade", "idh", "codel"]].notna().any(axis=1).sum()),
            "by_source": md_table(labels["source"].value_counts().rename_axis("source").reset_index()),
            "label_counts": md_table(label_counts, max_rows=40),
            "issues": len(result.issues),
            "issue_rows": md_table(result.issues),
        },
        output_name="glioma_labels",
    )
    return manifest, labels


class GliomaFoldSettings(dg.Config):
    n_folds: int = Field(default=5, description="cross-validation folds")
    seed: int = Field(default=0, description="seed of the (keyed-hash) order inside each stratum")


@dg.asset(
    kinds={"parquet"},
    owners=[OWNER_ML],
    description=(
        "Patient-level cross-validation folds of the labelled glioma cases (5 folds, seed 0), stratified on the "
        "IDH x 1p/19q combination (unknown = its own stratum); unlabelled cases get fold -1 (the unlabelled pool "
        "of the semi-supervised stages). Deterministic (ml.glioma.split.cv_folds)."
    ),
    **common,
)
def glioma_folds(
    context: dg.AssetExecutionContext, config: GliomaFoldSettings, glioma_labels: pd.DataFrame
) -> pd.DataFrame:
    from ml.glioma.split import cv_folds

    folds = cv_folds(glioma_labels, n_folds=config.n_folds, seed=config.seed)
    per = (
        folds.groupby(["stratum", "fold"]).size().unstack(fill_value=0).reset_index() if len(folds) else pd.DataFrame()
    )
    if len(per):
        per.columns = [str(c) for c in per.columns]
    context.add_output_metadata(
        {
            "patients": len(folds),
            "labelled": int((folds["fold"] >= 0).sum()),
            "unlabelled_pool": int((folds["fold"] < 0).sum()),
            "by_fold_and_stratum": md_table(per, max_rows=40),
        }
    )
    return folds
