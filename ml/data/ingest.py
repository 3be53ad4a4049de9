"""Study ingestion: raw files -> de-identified copies in the lake + index rows + quarantine.

This is the only code that reads identified data. For one study (see ``ml.data.inbox``):

1. every file is hashed, parsed and validated; a file that fails gets a quarantine record
   with a reason code and is moved (or, from a read-only source, copied) to quarantine;
2. image series are checked as a whole (``validate_series``); an inconsistent series is
   quarantined as a whole;
3. RT objects must reference something ingested in the same study (RTSTRUCT -> an image
   series or its frame of reference; RTDOSE -> an RT Plan or an image frame of reference);
4. what is left is de-identified (``DicomDeidentifier``; NIfTI headers cleared; OpenKBP CSVs
   converted to a compact array file) and written atomically under
   ``<lake>/studies/<study_key>/``; stale files from an earlier ingestion are removed.

Invariant, checked by the callers: ``files_seen == len(files) + len(quarantined)``.
Re-ingesting unchanged inputs produces byte-identical stored files and identical rows.
"""

from __future__ import annotations

import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ml.data.dicom.deid import DicomDeidentifier, Pseudonymizer, needs_pixel_cleaning, patient_key_of
from ml.data.dicom.headers import (
    IMAGE_MODALITIES,
    DicomInstance,
    IngestError,
    dataset_to_bytes,
    read_dataset,
    summarize,
    validate_pixels,
)
from ml.data.dicom.rtdose import referenced_beam_number
from ml.data.dicom.series import validate_series
from ml.data.inbox import FileRef, StudyGroup, fingerprint
from ml.data.quarantine import Quarantine, QuarantineRecord
from ml.data.roi_names import canonical_roi_name
from ml.utils.io import atomic_write_bytes, save_npz_deterministic, sha256_bytes, sha256_file
from ml.utils.tables import typed_frame

__all__ = ["FILE_COLUMNS", "SERIES_COLUMNS", "StudyIngest", "ingest_study", "pack_openkbp_patient", "unpack_openkbp"]

FILE_COLUMNS = {
    "study_key": "str",
    "patient_id": "str",
    "source": "str",
    "modality": "str",
    "sop_class_uid": "str",
    "sop_instance_uid": "str",
    "series_key": "str",
    "object_key": "str",
    "series_instance_uid": "str",
    "frame_of_reference_uid": "str",
    "sequence": "str",
    "roi_name": "str",
    "rows": "int64",
    "columns": "int64",
    "n_frames": "int64",
    "pixel_spacing_x": "float64",
    "pixel_spacing_y": "float64",
    "slice_thickness": "float64",
    "position_x": "float64",
    "position_y": "float64",
    "position_z": "float64",
    "orientation": "str",
    "stored_path": "str",
    "sha256": "str",
    "source_sha256": "str",
    "size_bytes": "int64",
}
SERIES_COLUMNS = {
    "study_key": "str",
    "patient_id": "str",
    "source": "str",
    "series_key": "str",
    "object_key": "str",
    "modality": "str",
    "sequence": "str",
    "n_files": "int64",
    "rows": "int64",
    "columns": "int64",
    "n_slices": "int64",
    "spacing_x": "float64",
    "spacing_y": "float64",
    "spacing_z": "float64",
    "origin_x": "float64",
    "origin_y": "float64",
    "origin_z": "float64",
    "orientation": "str",
    "frame_of_reference_uid": "str",
    "series_instance_uid": "str",
    "referenced_series_key": "str",
    "referenced_object_key": "str",
    "referenced_beam": "int64",
    "roi_names": "str",
    "n_rois": "int64",
    "dose_units": "str",
    "dose_summation_type": "str",
    "dose_max": "float64",
    "n_beams": "int64",
    "status": "str",
}


@dataclass
class StudyIngest:
    study_key: str
    source: str
    patient_id: str
    files: pd.DataFrame
    series: pd.DataFrame
    quarantined: list[QuarantineRecord]
    files_seen: int
    fingerprint_after: str
    stats: dict = field(default_factory=dict)

    @property
    def files_ingested(self) -> int:
        return len(self.files)

    def check_balance(self) -> None:
        if self.files_seen != self.files_ingested + len(self.quarantined):
            raise AssertionError(
                f"files seen ({self.files_seen}) != ingested ({self.files_ingested}) + "
                f"quarantined ({len(self.quarantined)})"
            )


class _Ctx:
    """Per-study bookkeeping shared by the source-specific ingesters."""

    def __init__(
        self, group: StudyGroup, lake_dir: Path, quarantine: Quarantine, pseudonymizer: Pseudonymizer, move_bad: bool
    ) -> None:
        self.group = group
        self.lake_dir = Path(lake_dir)
        self.study_dir = self.lake_dir / "studies" / group.key
        self.quarantine = quarantine
        self.p = pseudonymizer
        self.move_bad = move_bad
        self.records: list[QuarantineRecord] = []
        self.moved: set[str] = set()
        self.sha: dict[str, str] = {}

    def abspath(self, ref: FileRef) -> Path:
        return self.group.root / ref.relpath

    def source_sha(self, ref: FileRef) -> str:
        if ref.relpath not in self.sha:
            self.sha[ref.relpath] = sha256_file(self.abspath(ref))
        return self.sha[ref.relpath]

    def reject(self, ref: FileRef, reason: str, detail: str = "", raw_error: str = "") -> None:
        rec = self.quarantine.put(
            self.abspath(ref),
            reason=reason,
            detail=detail,
            study_key=self.group.key,
            source=self.group.source,
            move=self.move_bad,
            relpath=ref.relpath,
            raw_error=raw_error,
            sha256=self.source_sha(ref),
        )
        self.records.append(rec)
        if self.move_bad:
            self.moved.add(ref.relpath)

    def fingerprint_after(self) -> str:
        return fingerprint([f for f in self.group.files if f.relpath not in self.moved])

    def rel(self, path: Path) -> str:
        return path.relative_to(self.lake_dir).as_posix()

    def prune(self, subdir: str, keep: set[Path]) -> None:
        """Remove files of an earlier ingestion that are not part of this one."""
        root = self.study_dir / subdir
        if not root.exists():
            return
        for p in sorted(root.rglob("*"), reverse=True):
            if p.is_file() and p not in keep:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def ingest_study(
    group: StudyGroup,
    lake_dir: str | os.PathLike,
    quarantine: Quarantine,
    pseudonymizer: Pseudonymizer,
    *,
    move_bad: bool = True,
    require_dose: bool = True,
) -> StudyIngest:
    ctx = _Ctx(group, Path(lake_dir), quarantine, pseudonymizer, move_bad)
    if group.source == "dicom":
        result = _ingest_dicom(ctx)
    elif group.source == "nifti":
        result = _ingest_nifti(ctx)
    elif group.source == "openkbp":
        result = _ingest_openkbp(ctx, require_dose=require_dose)
    else:
        raise ValueError(f"unknown source {group.source!r}")
    result.check_balance()
    return result


# ---------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------
@dataclass
class _Item:
    ref: FileRef
    ds: object
    inst: DicomInstance
    sha: str
    extra: dict = field(default_factory=dict)


def _ingest_dicom(ctx: _Ctx) -> StudyIngest:
    items = _drop_duplicates(ctx, _read_valid_files(ctx))
    accepted_series = _accept_image_series(ctx, items)
    image_items = [m for members, _ in accepted_series.values() for m in members]
    rt_items = _referencing_rt_objects(ctx, items, accepted_series, _image_frames(image_items))
    patient_id, file_rows, stats = _deidentify_and_store(ctx, image_items + rt_items)
    series_rows = [_image_series_row(ctx, members, geom, patient_id) for members, geom in accepted_series.values()]
    series_rows += [_rt_object_row(ctx, it, patient_id) for it in rt_items]
    return StudyIngest(
        study_key=ctx.group.key,
        source="dicom",
        patient_id=patient_id,
        files=typed_frame(sorted(file_rows, key=lambda r: r["stored_path"]), FILE_COLUMNS),
        series=typed_frame(sorted(series_rows, key=lambda r: (r["modality"], r["object_key"])), SERIES_COLUMNS),
        quarantined=ctx.records,
        files_seen=len(ctx.group.files),
        fingerprint_after=ctx.fingerprint_after(),
        stats=stats,
    )


def _read_valid_files(ctx: _Ctx) -> list[_Item]:
    """Parse and validate every file of the study; a file that fails is quarantined."""
    items: list[_Item] = []
    for ref in ctx.group.files:
        sha = ctx.source_sha(ref)
        try:
            ds = read_dataset(ctx.abspath(ref))
            inst = summarize(ds, ctx.abspath(ref))
            validate_pixels(ds, inst)
            if needs_pixel_cleaning(ds):
                raise IngestError("burned_in_annotation")
        except IngestError as exc:
            ctx.reject(ref, exc.reason, exc.detail)
            continue
        items.append(_Item(ref, ds, inst, sha))
    return items


def _drop_duplicates(ctx: _Ctx, items: list[_Item]) -> list[_Item]:
    """One file per SOP instance: identical bytes, or the same SOP instance with different content,
    are quarantined (the file with the smallest (sha256, path) is kept)."""
    by_sop: dict[str, list[_Item]] = defaultdict(list)
    for it in items:
        by_sop[it.inst.sop_instance_uid].append(it)
    kept: list[_Item] = []
    for group in by_sop.values():
        group.sort(key=lambda it: (it.sha, it.ref.relpath))
        kept.append(group[0])
        for dup in group[1:]:
            reason = "duplicate_file" if dup.sha == group[0].sha else "duplicate_sop_instance"
            ctx.reject(dup.ref, reason)
    return kept


def _accept_image_series(ctx: _Ctx, items: list[_Item]) -> dict[str, tuple[list[_Item], object]]:
    """Image series checked as a whole (``validate_series``): series UID -> (members in slice order,
    geometry), in UID order; every member of an inconsistent series is quarantined."""
    series: dict[str, list[_Item]] = defaultdict(list)
    for it in items:
        if it.inst.modality in IMAGE_MODALITIES:
            series[it.inst.series_uid].append(it)
    accepted: dict[str, tuple[list[_Item], object]] = {}
    for uid, members in sorted(series.items()):
        modalities = {m.inst.modality for m in members}
        try:
            if len(modalities) > 1:
                raise IngestError("inconsistent_series", "mixed modalities in one series")
            ordered, geom = validate_series([m.inst for m in members])
        except IngestError as exc:
            for m in members:
                ctx.reject(m.ref, exc.reason, exc.detail)
            continue
        order = {id(inst): k for k, inst in enumerate(ordered)}
        members.sort(key=lambda m: order[id(m.inst)])
        accepted[uid] = (members, geom)
    return accepted


def _image_frames(image_items: list[_Item]) -> dict[str, str]:
    """Frame of reference UID -> the (last) accepted image series in it."""
    return {m.inst.frame_of_reference_uid: m.inst.series_uid for m in image_items if m.inst.frame_of_reference_uid}


def _referencing_rt_objects(
    ctx: _Ctx,
    items: list[_Item],
    accepted_series: dict,
    image_frames: dict[str, str],
) -> list[_Item]:
    """The RT Plans, then the RT Structure Sets and RT Doses (in file order) that reference something
    kept; the others are quarantined as ``dangling_reference``."""
    plans = {it.inst.sop_instance_uid: it for it in items if it.inst.modality == "RTPLAN"}
    rt_items: list[_Item] = list(plans.values())
    for it in items:
        m = it.inst.modality
        if m == "RTSTRUCT":
            kept = _resolve_rtstruct_reference(ctx, it, accepted_series, image_frames)
        elif m == "RTDOSE":
            kept = _resolve_rtdose_reference(ctx, it, plans, image_frames)
        else:
            continue
        if kept:
            rt_items.append(it)
    return rt_items


def _resolve_rtstruct_reference(ctx: _Ctx, it: _Item, accepted_series: dict, image_frames: dict[str, str]) -> bool:
    """Sets ``extra["ref_series"]`` from the referenced series, else the frame of reference."""
    ref_series = [s for s in it.inst.referenced_series_uids if s in accepted_series]
    ref_frames = [f for f in it.inst.referenced_frame_uids if f in image_frames]
    if ref_series:
        it.extra["ref_series"] = ref_series[0]
    elif ref_frames:
        it.extra["ref_series"] = image_frames[ref_frames[0]]
    else:
        ctx.reject(it.ref, "dangling_reference", "RTSTRUCT references no ingested image series")
        return False
    return True


def _resolve_rtdose_reference(ctx: _Ctx, it: _Item, plans: dict[str, _Item], image_frames: dict[str, str]) -> bool:
    """Sets ``extra["ref_plan"]`` and ``extra["ref_series"]`` (the image series of its frame)."""
    ref_plans = [p for p in it.inst.referenced_plan_uids if p in plans]
    frame_series = image_frames.get(it.inst.frame_of_reference_uid)
    if not ref_plans and frame_series is None:
        ctx.reject(it.ref, "dangling_reference", "RTDOSE references no ingested plan or image frame")
        return False
    it.extra["ref_plan"] = ref_plans[0] if ref_plans else ""
    it.extra["ref_series"] = frame_series or ""
    return True


def _deidentify_and_store(ctx: _Ctx, items: list[_Item]) -> tuple[str, list[dict], dict[str, int]]:
    """Describe, de-identify and write every kept file; prune what an earlier ingestion left.

    Returns the patient's pseudonym, the file rows and the de-identification counts."""
    deid = DicomDeidentifier(ctx.p, roi_name_map=canonical_roi_name)
    keep_paths: set[Path] = set()
    file_rows: list[dict] = []
    patient_id = ""
    stats = {"private_removed": 0, "removed": 0, "emptied": 0, "uids_remapped": 0}
    for it in items:
        patient_id = patient_id or ctx.p.patient(patient_key_of(it.ds))
        _describe(ctx, it)
        report = deid.deidentify(it.ds)
        for k in stats:
            stats[k] += getattr(report, k)
        keep_paths.add(_store(ctx, it))
        file_rows.append(_dicom_file_row(ctx, it, it.ds, patient_id))
    ctx.prune("dicom", keep_paths)
    return patient_id, file_rows, stats


def _describe(ctx: _Ctx, it: _Item) -> None:
    """What the rows need from the identified dataset: pseudonymous keys, MR sequence, ROI names."""
    inst, ds = it.inst, it.ds
    it.extra["series_key"] = ctx.p.short("series", inst.series_uid, "se-")
    it.extra["object_key"] = (
        it.extra["series_key"]
        if inst.modality in IMAGE_MODALITIES
        else ctx.p.short("sop", inst.sop_instance_uid, "ob-")
    )
    if inst.modality == "MR":
        from ml.data.mri import sequence_from_dicom

        it.extra["sequence"] = sequence_from_dicom(ds) or ""
    if inst.modality == "RTSTRUCT":
        rois = ds.get("StructureSetROISequence", []) or []
        names = [canonical_roi_name(str(roi.get("ROIName", "") or "")) for roi in rois]
        it.extra["roi_names"] = sorted({c for c in names if c})
        it.extra["n_rois"] = len(rois)


def _store(ctx: _Ctx, it: _Item) -> Path:
    """Write the de-identified dataset atomically under ``dicom/<series_key>/``; sets ``extra["stored"]``."""
    data = dataset_to_bytes(it.ds)
    dest = ctx.study_dir / "dicom" / it.extra["series_key"] / f"{ctx.p.short('sop', it.inst.sop_instance_uid)}.dcm"
    atomic_write_bytes(dest, data)
    it.extra["stored"] = (dest, sha256_bytes(data), len(data))
    return dest


def _image_series_row(ctx: _Ctx, members: list[_Item], geom, patient_id: str) -> dict:
    first = members[0]
    return {
        "study_key": ctx.group.key,
        "patient_id": patient_id,
        "source": "dicom",
        "series_key": first.extra["series_key"],
        "object_key": first.extra["object_key"],
        "modality": first.inst.modality,
        "sequence": first.extra.get("sequence", ""),
        "n_files": len(members),
        "rows": geom.rows,
        "columns": geom.columns,
        "n_slices": geom.n_slices,
        "spacing_x": geom.spacing[0],
        "spacing_y": geom.spacing[1],
        "spacing_z": geom.spacing[2],
        "origin_x": geom.origin[0],
        "origin_y": geom.origin[1],
        "origin_z": geom.origin[2],
        "orientation": _fmt(first.inst.image_orientation),
        "frame_of_reference_uid": str(first.ds.get("FrameOfReferenceUID", "") or ""),
        "series_instance_uid": str(first.ds.SeriesInstanceUID),
        "status": "ok",
    }


def _rt_object_row(ctx: _Ctx, it: _Item, patient_id: str) -> dict:
    ds, inst = it.ds, it.inst
    row = {
        "study_key": ctx.group.key,
        "patient_id": patient_id,
        "source": "dicom",
        "series_key": it.extra["series_key"],
        "object_key": it.extra["object_key"],
        "modality": inst.modality,
        "n_files": 1,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "status": "ok",
        "referenced_series_key": ctx.p.short("series", it.extra["ref_series"], "se-")
        if it.extra.get("ref_series")
        else "",
        "referenced_object_key": ctx.p.short("sop", it.extra["ref_plan"], "ob-") if it.extra.get("ref_plan") else "",
    }
    if inst.modality == "RTSTRUCT":
        row["roi_names"] = ",".join(it.extra["roi_names"])
        row["n_rois"] = it.extra["n_rois"]
    elif inst.modality == "RTDOSE":
        row.update(_rtdose_columns(it))
    elif inst.modality == "RTPLAN":
        row["n_beams"] = inst.extra.get("n_beams", 0)
    return row


def _rtdose_columns(it: _Item) -> dict:
    """The grid, units, summation type, maximum and referenced beam of an RT Dose row."""
    ds, inst = it.ds, it.inst
    return {
        "referenced_beam": referenced_beam_number(ds),
        "rows": inst.rows,
        "columns": inst.columns,
        "n_slices": inst.number_of_frames,
        "spacing_x": inst.pixel_spacing[1],
        "spacing_y": inst.pixel_spacing[0],
        "origin_x": inst.image_position[0],
        "origin_y": inst.image_position[1],
        "origin_z": inst.image_position[2],
        "orientation": _fmt(inst.image_orientation),
        "dose_units": str(ds.get("DoseUnits", "") or ""),
        "dose_summation_type": str(ds.get("DoseSummationType", "") or ""),
        "dose_max": _dose_max(ds),
    }


def _fmt(values) -> str:
    return ",".join(f"{float(v):.6g}" for v in values) if values else ""


def _dose_max(ds) -> float:
    try:
        from ml.data.dicom.headers import decode_pixels

        return float(np.max(decode_pixels(ds)) * float(ds.DoseGridScaling))
    except Exception:  # noqa: BLE001
        return float("nan")


def _dicom_file_row(ctx: _Ctx, it: _Item, ds, patient_id: str) -> dict:
    inst = it.inst
    dest, sha, size = it.extra["stored"]
    ipp = inst.image_position or (None, None, None)
    ps = inst.pixel_spacing or (None, None)
    return {
        "study_key": ctx.group.key,
        "patient_id": patient_id,
        "source": "dicom",
        "modality": inst.modality,
        "sop_class_uid": inst.sop_class_uid,
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_key": it.extra["series_key"],
        "object_key": it.extra["object_key"],
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or ""),
        "sequence": it.extra.get("sequence", ""),
        "roi_name": "",
        "rows": inst.rows,
        "columns": inst.columns,
        "n_frames": inst.number_of_frames,
        "pixel_spacing_x": ps[1],
        "pixel_spacing_y": ps[0],
        "slice_thickness": inst.slice_thickness,
        "position_x": ipp[0],
        "position_y": ipp[1],
        "position_z": ipp[2],
        "orientation": _fmt(inst.image_orientation),
        "stored_path": ctx.rel(dest),
        "sha256": sha,
        "source_sha256": it.sha,
        "size_bytes": size,
    }


# ---------------------------------------------------------------------------------------
# NIfTI (BraTS layout and friends)
# ---------------------------------------------------------------------------------------
def _ingest_nifti(ctx: _Ctx) -> StudyIngest:
    import nibabel as nib

    from ml.data.mri import sequence_from_text
    from ml.data.volume import nifti_to_volume, write_nifti

    labelled: dict[str, list[tuple[FileRef, object]]] = defaultdict(list)
    for ref in ctx.group.files:
        ctx.source_sha(ref)
        label = sequence_from_text(Path(ref.relpath).name)
        if label is None:
            ctx.reject(ref, "unrecognised_sequence")
            continue
        try:
            img = nib.load(str(ctx.abspath(ref)))
            vol = nifti_to_volume(img)
            if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
                raise IngestError("invalid_content", "non-finite voxel values")
            if vol.array.size == 0 or min(vol.array.shape) < 1:
                raise IngestError("invalid_content", "empty image")
        except IngestError as exc:
            ctx.reject(ref, exc.reason, exc.detail)
            continue
        except (EOFError, OSError, zipfile.BadZipFile) as exc:
            ctx.reject(ref, "truncated", type(exc).__name__)
            continue
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
            ctx.reject(ref, "unreadable", type(exc).__name__)
            continue
        labelled[label].append((ref, vol))

    patient_id = ctx.p.patient(f"nifti:{Path(ctx.group.files[0].relpath).parent.as_posix()}") if ctx.group.files else ""
    keep: set[Path] = set()
    file_rows, series_rows = [], []
    for label in sorted(labelled):
        candidates = sorted(labelled[label], key=lambda rv: ctx.sha[rv[0].relpath])
        if len(candidates) > 1:
            for ref, _ in candidates:
                ctx.reject(ref, "ambiguous_sequence", f"{len(candidates)} files look like {label}")
            continue
        ref, vol = candidates[0]
        dest = ctx.study_dir / "nifti" / f"{label}.nii.gz"
        if label == "seg":
            vol = vol.with_array(np.rint(vol.array).astype(np.uint8))
        write_nifti(vol, dest)
        keep.add(dest)
        sha = sha256_file(dest)
        key = ctx.p.short("series", f"{ctx.group.key}/{label}", "se-")
        file_rows.append(
            {
                "study_key": ctx.group.key,
                "patient_id": patient_id,
                "source": "nifti",
                "modality": "SEG" if label == "seg" else "MR",
                "series_key": key,
                "object_key": key,
                "sequence": label,
                "rows": vol.array.shape[1],
                "columns": vol.array.shape[2],
                "n_frames": vol.array.shape[0],
                "pixel_spacing_x": vol.spacing[0],
                "pixel_spacing_y": vol.spacing[1],
                "slice_thickness": vol.spacing[2],
                "position_x": vol.origin[0],
                "position_y": vol.origin[1],
                "position_z": vol.origin[2],
                "orientation": _fmt(vol.direction[0::3] + vol.direction[1::3]),
                "stored_path": ctx.rel(dest),
                "sha256": sha,
                "source_sha256": ctx.sha[ref.relpath],
                "size_bytes": dest.stat().st_size,
            }
        )
        series_rows.append(
            {
                "study_key": ctx.group.key,
                "patient_id": patient_id,
                "source": "nifti",
                "series_key": key,
                "object_key": key,
                "modality": "SEG" if label == "seg" else "MR",
                "sequence": label,
                "n_files": 1,
                "rows": vol.array.shape[1],
                "columns": vol.array.shape[2],
                "n_slices": vol.array.shape[0],
                "spacing_x": vol.spacing[0],
                "spacing_y": vol.spacing[1],
                "spacing_z": vol.spacing[2],
                "origin_x": vol.origin[0],
                "origin_y": vol.origin[1],
                "origin_z": vol.origin[2],
                "orientation": _fmt(vol.direction),
                "status": "ok",
            }
        )
    ctx.prune("nifti", keep)
    return StudyIngest(
        study_key=ctx.group.key,
        source="nifti",
        patient_id=patient_id,
        files=typed_frame(file_rows, FILE_COLUMNS),
        series=typed_frame(series_rows, SERIES_COLUMNS),
        quarantined=ctx.records,
        files_seen=len(ctx.group.files),
        fingerprint_after=ctx.fingerprint_after(),
    )


# ---------------------------------------------------------------------------------------
# OpenKBP
# ---------------------------------------------------------------------------------------
def pack_openkbp_patient(patient) -> dict[str, np.ndarray]:
    """The compact stored form: int16 HU, float32 dose, bit-packed masks."""
    from ml.data.roi_names import OPENKBP_ROIS

    arrays = {
        "ct_hu": patient.ct_hu.astype(np.int16),
        "possible_dose_mask": np.packbits(patient.possible_dose_mask.reshape(-1)),
        "voxel_dimensions": np.asarray(patient.voxel_dimensions, dtype=np.float64),
        "roi_names": np.asarray([n for n in OPENKBP_ROIS if n in patient.structures], dtype="U16"),
    }
    if patient.dose is not None:
        arrays["dose"] = patient.dose.astype(np.float32)
    for name, mask in patient.structures.items():
        arrays[f"roi_{name}"] = np.packbits(mask.reshape(-1))
    return arrays


def unpack_openkbp(path: str | os.PathLike):
    """Inverse of ``pack_openkbp_patient`` -> ``OpenKBPPatient``."""
    from ml.data.openkbp import SHAPE, OpenKBPPatient

    n = int(np.prod(SHAPE))
    with np.load(path, allow_pickle=False) as z:
        structures = {
            str(name): np.unpackbits(z[f"roi_{name}"], count=n).astype(bool).reshape(SHAPE) for name in z["roi_names"]
        }
        return OpenKBPPatient(
            ct_hu=z["ct_hu"],
            dose=z["dose"] if "dose" in z.files else None,
            possible_dose_mask=np.unpackbits(z["possible_dose_mask"], count=n).astype(bool).reshape(SHAPE),
            structures=structures,
            voxel_dimensions=tuple(float(v) for v in z["voxel_dimensions"]),
        )


def _ingest_openkbp(ctx: _Ctx, require_dose: bool) -> StudyIngest:
    from ml.data.openkbp import OpenKBPError, canonical_geometry, load_patient

    folder = ctx.abspath(ctx.group.files[0]).parent
    for ref in ctx.group.files:
        ctx.source_sha(ref)
    patient_id = ctx.p.patient(f"openkbp:{folder.name}")
    try:
        patient = load_patient(folder, require_dose=require_dose)
    except OpenKBPError as exc:
        for ref in ctx.group.files:
            ctx.reject(ref, exc.reason, exc.detail)
        ctx.prune("openkbp", set())
        return StudyIngest(
            study_key=ctx.group.key,
            source="openkbp",
            patient_id=patient_id,
            files=typed_frame([], FILE_COLUMNS),
            series=typed_frame([], SERIES_COLUMNS),
            quarantined=ctx.records,
            files_seen=len(ctx.group.files),
            fingerprint_after=ctx.fingerprint_after(),
        )
    dest = ctx.study_dir / "openkbp" / "patient.npz"
    data = save_npz_deterministic(dest, pack_openkbp_patient(patient))
    sha = sha256_bytes(data)
    ctx.prune("openkbp", {dest})
    geom = canonical_geometry(patient.voxel_dimensions)
    key = ctx.p.short("series", f"{ctx.group.key}/openkbp", "se-")
    file_rows = []
    for ref in ctx.group.files:
        logical = Path(ref.relpath).name.split(".")[0]
        modality = {"ct": "CT", "dose": "RTDOSE", "voxel_dimensions": "META", "possible_dose_mask": "MASK"}.get(
            logical, "RTSTRUCT"
        )
        file_rows.append(
            {
                "study_key": ctx.group.key,
                "patient_id": patient_id,
                "source": "openkbp",
                "modality": modality,
                "series_key": key,
                "object_key": f"{key}/{logical}",
                "roi_name": logical if modality == "RTSTRUCT" else "",
                "rows": 128,
                "columns": 128,
                "n_frames": 128,
                "pixel_spacing_x": geom["spacing"][0],
                "pixel_spacing_y": geom["spacing"][1],
                "slice_thickness": geom["spacing"][2],
                "stored_path": ctx.rel(dest),
                "sha256": sha,
                "source_sha256": ctx.sha[ref.relpath],
                "size_bytes": len(data),
            }
        )
    series_rows = [
        {
            "study_key": ctx.group.key,
            "patient_id": patient_id,
            "source": "openkbp",
            "series_key": key,
            "object_key": key,
            "modality": "CT",
            "n_files": len(ctx.group.files),
            "rows": 128,
            "columns": 128,
            "n_slices": 128,
            "spacing_x": geom["spacing"][0],
            "spacing_y": geom["spacing"][1],
            "spacing_z": geom["spacing"][2],
            "origin_x": geom["origin"][0],
            "origin_y": geom["origin"][1],
            "origin_z": geom["origin"][2],
            "orientation": "1,0,0,0,1,0",
            "roi_names": ",".join(sorted(patient.structures)),
            "n_rois": len(patient.structures),
            "dose_units": "GY" if patient.dose is not None else "",
            "dose_max": float(patient.dose.max()) if patient.dose is not None else float("nan"),
            "status": "ok",
        }
    ]
    return StudyIngest(
        study_key=ctx.group.key,
        source="openkbp",
        patient_id=patient_id,
        files=typed_frame(sorted(file_rows, key=lambda r: r["object_key"]), FILE_COLUMNS),
        series=typed_frame(series_rows, SERIES_COLUMNS),
        quarantined=ctx.records,
        files_seen=len(ctx.group.files),
        fingerprint_after=ctx.fingerprint_after(),
    )
