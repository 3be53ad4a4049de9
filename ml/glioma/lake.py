"""Glioma sources into the lake (de-identified NIfTI + a manifest + a label table) and back out
to the shared training layout.

Lake layout (under ``<lake>/glioma/``)::

    volumes/<patient_id>/<sequence>.nii.gz   t1, t1c, t2, flair (as stored) and seg (0/1 uint8)
    receipts/<patient_id>.json                what a source case became (idempotent reruns)

``patient_id`` is the keyed-hash pseudonym of the *case* (``Pseudonymizer.patient`` of
``"<source>:<case>"``); ``subject_id`` is the pseudonym of the person where the source names one
(a TCGA barcode: the same person in lgg-mri and brain-mri-samples gets the same ``subject_id``),
else the case pseudonym. Nothing identifying reaches the lake: no source folder names (they carry
acquisition dates), NIfTI headers with empty free-text fields (``ml.data.volume.write_nifti``).

Sources:

* **lgg-mri** (``import_lgg``): ``patients/<id>.npz`` (image uint8 (S, 3, 128, 128): 0 pre-contrast
  T1 -> ``t1``, 1 FLAIR -> ``flair``, 2 post-contrast T1 -> ``t1c``; mask (S, 128, 128)) and
  ``labels.csv``. Each channel becomes a 128 x 128 x S NIfTI volume at a nominal 1 mm (the
  source records no geometry: ``spacing_known = False``), layout ``slices`` (a 2D slice stack,
  not a volume in mm). A channel listed in ``missing_sequences`` (pre-contrast -> t1,
  post-contrast -> t1c; the source filled it with a FLAIR copy) is not written; a channel found
  identical to FLAIR on every slice but not listed is dropped as well, with an issue row.
* **brain-mri-samples** (``import_brain_samples``): every folder with NIfTI files is one case;
  sequences named from file names (``ml.data.mri.sequence_from_text``), co-registered onto the
  reference sequence's canonical grid (``ml.data.mri.coregister``: same-grid BraTS/TCGA data are
  only resampled, the native-space case is rigidly registered); ``seg`` (fused BraTS labels
  1/2/4) is binarised to whole tumour. Layout ``volume``, ``spacing_known = True``, no labels.

Bad input is never a crash: an unreadable npz/NIfTI, a mask of another shape than the image, an
image with a wrong channel count, an unrecognised or ambiguous sequence go to quarantine
(``ml.data.quarantine.Quarantine``, copied: the sources are read-only); a label outside the
vocabulary (``ml.glioma.data.TASKS``) becomes unknown (null) with an issue row.

Idempotent: a case whose receipt matches (source content hash, missing sequences, this module's
``LAKE_VERSION``) and whose stored files still have their recorded sha256 is not touched.
Volumes of cases that left the source are not removed (a subset run must not delete the rest).

``export_training_dir`` writes the lake back as the shared training layout (``ml.glioma.data``):
``patients/<patient_id>.npz`` + ``labels.csv``; see its docstring.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ml.data.quarantine import Quarantine, QuarantineRecord
from ml.glioma.data import LABEL_COLUMNS, LGG_CHANNELS, LGG_MISSING, SEQUENCES, TASKS, read_labels
from ml.utils.io import atomic_write_json, atomic_write_text, save_npz_deterministic, sha256_bytes, sha256_file

__all__ = [
    "BRAIN_SOURCE",
    "ISSUE_COLUMNS",
    "LABEL_TABLE_COLUMNS",
    "LAKE_VERSION",
    "LGG_SOURCE",
    "MANIFEST_COLUMNS",
    "LakeImport",
    "export_training_dir",
    "import_brain_samples",
    "import_lgg",
    "merge_imports",
]

LAKE_VERSION = 1
LAKE_SUBDIR = "glioma"
LGG_SOURCE = "lgg-mri"
BRAIN_SOURCE = "brain-mri-samples"
#: share of a slice's pixels that must be non-zero (any sequence) for a 3D slice to count as brain
BRAIN_SLICE_FRACTION = 0.01

MANIFEST_COLUMNS = [
    "patient_id",
    "source",
    "sequence",
    "layout",
    "path",
    "shape",
    "sha256",
    "spacing_known",
]
LABEL_TABLE_COLUMNS = [
    "patient_id",
    "subject_id",
    "source",
    "histology",
    "grade",
    "idh",
    "codel",
    "n_slices",
    "n_tumour_slices",
    "missing_sequences",
]
ISSUE_COLUMNS = ["patient_id", "reason", "detail", "action"]
_TCGA = re.compile(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}")


class LakeImport(NamedTuple):
    """What an import produced: the volume manifest, the label table (one row per case), the
    quarantine records (PHI-free) and the issue rows (patient_id pseudonym, reason, detail, action)."""

    manifest: pd.DataFrame
    labels: pd.DataFrame
    quarantined: list[QuarantineRecord]
    issues: pd.DataFrame


# ---------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------
def _manifest_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for col in MANIFEST_COLUMNS:
        df[col] = df[col].astype(bool) if col == "spacing_known" else df[col].astype("str")
    return df.sort_values(["patient_id", "sequence"], kind="stable").reset_index(drop=True)


def _labels_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=LABEL_TABLE_COLUMNS)
    for col in LABEL_TABLE_COLUMNS:
        if col in ("n_slices", "n_tumour_slices"):
            df[col] = pd.array(df[col].tolist(), dtype="Int64")
        else:
            df[col] = pd.Series([None if v is None or v != v else str(v) for v in df[col]], dtype="str")
    return df.sort_values("patient_id", kind="stable").reset_index(drop=True)


def _issues_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS).astype("str").reset_index(drop=True)


def merge_imports(*imports: LakeImport) -> LakeImport:
    """Several imports (lgg-mri, brain-mri-samples) as one."""
    return LakeImport(
        manifest=_manifest_frame([r for i in imports for r in i.manifest.to_dict("records")]),
        labels=_labels_frame([r for i in imports for r in i.labels.to_dict("records")]),
        quarantined=[r for i in imports for r in i.quarantined],
        issues=_issues_frame([r for i in imports for r in i.issues.to_dict("records")]),
    )


def _issue(patient_id: str, reason: str, detail: str, action: str) -> dict:
    return {"patient_id": patient_id, "reason": reason, "detail": detail, "action": action}


def _missing_text(present: set[str]) -> str:
    return ";".join(s for s in SEQUENCES if s not in present)


# ---------------------------------------------------------------------------------------
# receipts and volume files
# ---------------------------------------------------------------------------------------
class _Case:
    """Bookkeeping of one case: its pseudonyms, folder, receipt and the files written."""

    def __init__(self, lake_dir: Path, patient_id: str, source: str) -> None:
        self.lake_dir = lake_dir
        self.patient_id = patient_id
        self.source = source
        self.dir = lake_dir / LAKE_SUBDIR / "volumes" / patient_id
        self.receipt_path = lake_dir / LAKE_SUBDIR / "receipts" / f"{patient_id}.json"

    def cached(self, key: str) -> dict | None:
        """The receipt when it matches ``key`` and every recorded file is intact."""
        if not self.receipt_path.exists():
            return None
        try:
            receipt = json.loads(self.receipt_path.read_text())
        except (OSError, ValueError):
            return None
        if receipt.get("key") != key or receipt.get("version") != LAKE_VERSION:
            return None
        for row in receipt.get("rows", []):
            path = self.lake_dir / row["path"]
            if not path.exists() or sha256_file(path) != row["sha256"]:
                return None
        return receipt

    def write(self, sequence: str, volume, layout: str, spacing_known: bool) -> dict:
        from ml.data.volume import write_nifti

        path = self.dir / f"{sequence}.nii.gz"
        write_nifti(volume, path)
        z, y, x = volume.array.shape
        return {
            "patient_id": self.patient_id,
            "source": self.source,
            "sequence": sequence,
            "layout": layout,
            "path": path.relative_to(self.lake_dir).as_posix(),
            "shape": f"{x}x{y}x{z}",
            "sha256": sha256_file(path),
            "spacing_known": spacing_known,
        }

    def finish(self, key: str, rows: list[dict], stats: dict) -> dict:
        """Remove files of an earlier import that are not part of this one; write the receipt."""
        keep = {self.lake_dir / r["path"] for r in rows}
        if self.dir.exists():
            for p in sorted(self.dir.iterdir()):
                if p.is_file() and p not in keep:
                    p.unlink()
        receipt = {"version": LAKE_VERSION, "key": key, "rows": rows, "stats": stats}
        atomic_write_json(self.receipt_path, receipt)
        return receipt


def _key(payload: dict) -> str:
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())


def _subject(pseudonymizer, text: str, fallback: str) -> str:
    m = _TCGA.search(text)
    return pseudonymizer.patient(f"tcga:{m.group(0)}") if m else fallback


# ---------------------------------------------------------------------------------------
# lgg-mri
# ---------------------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _read_lgg_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except EOFError as exc:
        raise _Bad("truncated", f"npz cannot be read ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise many types on bad files
        raise _Bad("unreadable", f"npz cannot be read ({type(exc).__name__})") from None
    img = arrays.get("image")
    if img is None:
        raise _Bad("invalid_content", "no 'image' array")
    if img.ndim != 4 or img.shape[1] != 3:
        raise _Bad("invalid_content", f"image shape {img.shape}: (S, 3, H, W) expected (3 lgg-mri channels)")
    if img.shape[0] == 0 or img.dtype.kind not in "uif":
        raise _Bad("invalid_content", f"image is empty or not numeric ({img.dtype})")
    if img.dtype.kind == "f" and not np.all(np.isfinite(img)):
        raise _Bad("invalid_content", "non-finite image values")
    mask = arrays.get("mask")
    if mask is not None and mask.shape != (img.shape[0], img.shape[2], img.shape[3]):
        raise _Bad(
            "invalid_content", f"mask shape {mask.shape} does not match image slices {img.shape[:1] + img.shape[2:]}"
        )
    return img, mask


def import_lgg(
    src_dir: str | os.PathLike,
    lake_dir: str | os.PathLike,
    pseudonymizer,
    quarantine: Quarantine,
    *,
    max_patients: int | None = None,
) -> LakeImport:
    """lgg-mri (``patients/*.npz`` + ``labels.csv``) into the lake; see the module docstring.
    ``max_patients``: only the first N patients in file-name order (tests, smoke runs)."""
    from ml.data.volume import Volume

    src, lake = Path(src_dir), Path(lake_dir)
    files = sorted((src / "patients").glob("*.npz"))
    subset = max_patients is not None and max_patients < len(files)
    if subset:
        files = files[:max_patients]
    manifest, label_rows, issues, records = [], [], [], []
    codes = pd.DataFrame(columns=["patient_id", *TASKS, "missing_sequences"])
    pseud = {f.stem: pseudonymizer.patient(f"{LGG_SOURCE}:{f.stem}") for f in files}
    if (src / "labels.csv").exists():
        codes, label_issues = read_labels(src / "labels.csv")
        for it in label_issues:
            pid = it["patient_id"]
            if pid in pseud:
                issues.append(_issue(pseud[pid], it["reason"], it["detail"], it["action"]))
    else:
        issues.append(_issue("", "no_labels_file", "labels.csv not found: every patient unlabelled", "labels unknown"))
    by_id = {r["patient_id"]: r for r in codes.to_dict("records")}
    if not subset:
        for pid in sorted(set(by_id) - set(pseud)):
            pp = pseudonymizer.patient(f"{LGG_SOURCE}:{pid}")
            issues.append(_issue(pp, "label_without_image", "labels.csv row without an npz", "row ignored"))

    for f in files:
        pid = pseud[f.stem]
        case = _Case(lake, pid, LGG_SOURCE)
        row = by_id.get(f.stem)
        listed = str((row or {}).get("missing_sequences") or "")
        listed_missing = {LGG_MISSING.get(m.strip(), m.strip()) for m in listed.split(";") if m.strip()}
        key = _key({"source": LGG_SOURCE, "sha256": sha256_file(f), "missing": sorted(listed_missing)})
        receipt = case.cached(key)
        if receipt is None:
            try:
                img, mask = _read_lgg_npz(f)
            except _Bad as bad:
                records.append(
                    quarantine.put(
                        f,
                        reason=bad.reason,
                        detail=f"{pid}: {bad.detail}",
                        source=LGG_SOURCE,
                        move=False,
                        relpath=f"patients/{f.name}",
                    )
                )
                continue
            detected = {
                seq for ch, seq in LGG_CHANNELS.items() if seq != "flair" and np.array_equal(img[:, ch], img[:, 1])
            }
            missing = listed_missing | detected
            note = ""
            if detected != listed_missing:
                note = f"listed {sorted(listed_missing)}, identical to FLAIR {sorted(detected)}"
            rows = []
            for ch, seq in LGG_CHANNELS.items():
                if seq not in missing:
                    rows.append(
                        case.write(seq, Volume(np.ascontiguousarray(img[:, ch]), (1.0, 1.0, 1.0)), "slices", False)
                    )
            if mask is not None:
                seg = (mask > 0).astype(np.uint8)
                rows.append(case.write("seg", Volume(seg, (1.0, 1.0, 1.0)), "slices", False))
            stats = {
                "n_slices": int(img.shape[0]),
                "n_tumour_slices": int((mask > 0).reshape(len(mask), -1).any(axis=1).sum())
                if mask is not None
                else None,
                "present": sorted(s for s in LGG_CHANNELS.values() if s not in missing),
                "missing_note": note,
            }
            receipt = case.finish(key, rows, stats)
        stats = receipt["stats"]
        if row is None:
            issues.append(_issue(pid, "no_label_row", "patient not in labels.csv", "labels unknown"))
        if stats.get("missing_note"):
            issues.append(_issue(pid, "missing_sequences_mismatch", stats["missing_note"], "both treated as missing"))
        manifest += receipt["rows"]
        label_rows.append(
            {
                "patient_id": pid,
                "subject_id": _subject(pseudonymizer, f.stem, pid),
                "source": LGG_SOURCE,
                **{t: (TASKS[t][int(row[t])] if row is not None and int(row[t]) >= 0 else None) for t in TASKS},
                "n_slices": stats["n_slices"],
                "n_tumour_slices": stats["n_tumour_slices"],
                "missing_sequences": _missing_text(set(stats["present"])),
            }
        )
    return LakeImport(_manifest_frame(manifest), _labels_frame(label_rows), records, _issues_frame(issues))


# ---------------------------------------------------------------------------------------
# brain-mri-samples (BraTS layout, TCGA skull-stripped, native space)
# ---------------------------------------------------------------------------------------
def _nifti_cases(src: Path) -> list[tuple[str, list[Path]]]:
    """(case folder relative to ``src``, its NIfTI files) in path order; symlinked folders are followed."""
    by_dir: dict[Path, list[Path]] = {}
    for root, _dirs, names in os.walk(src, followlinks=True):
        for name in names:
            if re.search(r"\.nii(\.gz)?$", name, flags=re.IGNORECASE):
                by_dir.setdefault(Path(root), []).append(Path(root) / name)
    return [(d.relative_to(src).as_posix(), sorted(files)) for d, files in sorted(by_dir.items())]


def import_brain_samples(
    src_dir: str | os.PathLike,
    lake_dir: str | os.PathLike,
    pseudonymizer,
    quarantine: Quarantine,
    *,
    max_cases: int | None = None,
    rigid: bool = True,
) -> LakeImport:
    """Every folder of NIfTI files under ``src_dir`` as one unlabelled case (co-registered
    sequences + binarised ``seg``); see the module docstring. ``max_cases``: the first N folders
    in path order; ``rigid``: rigid registration of sequences on other grids (else world-
    coordinate resampling only)."""
    import nibabel as nib

    from ml.data.mri import coregister, sequence_from_text
    from ml.data.volume import nifti_to_volume

    src, lake = Path(src_dir), Path(lake_dir)
    cases = _nifti_cases(src)
    if max_cases is not None:
        cases = cases[:max_cases]
    manifest, label_rows, issues, records = [], [], [], []
    for rel, files in cases:
        pid = pseudonymizer.patient(f"{BRAIN_SOURCE}:{rel}")
        case = _Case(lake, pid, BRAIN_SOURCE)
        shas = {f.name: sha256_file(f) for f in files}
        key = _key({"source": BRAIN_SOURCE, "files": sorted(shas.items()), "rigid": rigid})
        receipt = case.cached(key)
        if receipt is None:

            def reject(f: Path, reason: str, detail: str, pid=pid, rel=rel, shas=shas) -> None:
                records.append(
                    quarantine.put(
                        f,
                        reason=reason,
                        detail=f"{pid}: {detail}",
                        source=BRAIN_SOURCE,
                        move=False,
                        relpath=f"{rel}/{f.name}",
                        sha256=shas[f.name],
                    )
                )

            labelled: dict[str, list[tuple[Path, object]]] = {}
            for f in files:
                label = sequence_from_text(f.name)
                if label is None:
                    reject(f, "unrecognised_sequence", "file name names no sequence")
                    continue
                try:
                    vol = nifti_to_volume(nib.load(str(f)))
                    if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
                        raise _Bad("invalid_content", "non-finite voxel values")
                except _Bad as bad:
                    reject(f, bad.reason, bad.detail)
                    continue
                except (EOFError, zipfile.BadZipFile) as exc:
                    reject(f, "truncated", type(exc).__name__)
                    continue
                except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
                    reject(f, "unreadable", type(exc).__name__)
                    continue
                labelled.setdefault(label, []).append((f, vol))
            volumes = {}
            for label, found in sorted(labelled.items()):
                if len(found) > 1:
                    for f, _ in found:
                        reject(f, "ambiguous_sequence", f"{len(found)} files look like {label}")
                    continue
                volumes[label] = found[0][1]
            rows: list[dict] = []
            stats: dict = {"n_slices": None, "n_tumour_slices": None, "present": [], "registration": {}}
            if any(s in volumes for s in SEQUENCES):
                try:
                    registered, report = coregister(volumes, rigid=rigid)
                except Exception as exc:  # noqa: BLE001 - SimpleITK raises RuntimeError subclasses and more
                    for label, vol in volumes.items():
                        f = next(f for f, v in labelled[label] if v is vol)
                        reject(f, "invalid_content", f"co-registration failed ({type(exc).__name__})")
                    registered, report = {}, {}
                for label in sorted(registered):
                    vol = registered[label]
                    if label == "seg":
                        vol = vol.with_array((vol.array > 0).astype(np.uint8))  # BraTS 1/2/4 -> whole tumour
                    else:
                        vol = vol.with_array(vol.array.astype(np.float32))
                    rows.append(case.write(label, vol, "volume", True))
                if registered:
                    ref = next(iter(registered.values()))
                    stats["n_slices"] = int(ref.array.shape[0])
                    if "seg" in registered:
                        seg = registered["seg"].array > 0
                        stats["n_tumour_slices"] = int(seg.reshape(len(seg), -1).any(axis=1).sum())
                    stats["present"] = sorted(s for s in registered if s in SEQUENCES)
                    stats["registration"] = {
                        k: {kk: v[kk] for kk in ("role", "registered") if kk in v} for k, v in report.items()
                    }
            elif volumes:
                for label in volumes:
                    reject(labelled[label][0][0], "incomplete_patient", "a segmentation without any MRI sequence")
            receipt = case.finish(key, rows, stats)
        stats = receipt["stats"]
        if not receipt["rows"]:
            issues.append(_issue(pid, "no_sequence", "no usable MRI sequence in the case", "case skipped"))
            continue
        manifest += receipt["rows"]
        label_rows.append(
            {
                "patient_id": pid,
                "subject_id": _subject(pseudonymizer, rel, pid),
                "source": BRAIN_SOURCE,
                **dict.fromkeys(TASKS),
                "n_slices": stats["n_slices"],
                "n_tumour_slices": stats["n_tumour_slices"],
                "missing_sequences": _missing_text(set(stats["present"])),
            }
        )
    return LakeImport(_manifest_frame(manifest), _labels_frame(label_rows), records, _issues_frame(issues))


# ---------------------------------------------------------------------------------------
# export: the shared training layout
# ---------------------------------------------------------------------------------------
def _square_resize(stack: np.ndarray, size: int, order: int) -> np.ndarray:
    """(S, H, W) -> (S, size, size): zero-pad to a centred square, then resize in-plane
    (``order`` 1 = linear for images, 0 = nearest for masks)."""
    s, h, w = stack.shape
    side = max(h, w)
    if (h, w) != (side, side):
        out = np.zeros((s, side, side), stack.dtype)
        y0, x0 = (side - h) // 2, (side - w) // 2
        out[:, y0 : y0 + h, x0 : x0 + w] = stack
        stack = out
    if side == size:
        return stack
    from scipy.ndimage import zoom

    return zoom(stack, (1.0, size / side, size / side), order=order, grid_mode=True, mode="grid-constant")


def export_training_dir(
    manifest: pd.DataFrame,
    labels: pd.DataFrame,
    lake_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    size: int = 128,
) -> pd.DataFrame:
    """The lake as the shared training layout (the one format ``python -m ml glioma`` reads):

    * ``out_dir/patients/<patient_id>.npz``: ``image`` float32 (S, 4, size, size) in
      ``SEQUENCES`` order (flair, t1c, t1, t2), absent sequences all zero; ``present`` bool (4,);
      ``mask`` uint8 0/1 (S, size, size) when the case has a ``seg``; ``slice_index`` int16
      (1-based source slice number); ``spacing`` float64 (row, col, slice) mm, NaN when unknown;
      ``sequences`` (the channel names).
    * ``out_dir/labels.csv``: ``patient_id, histology, grade, idh_status, codeletion_1p19q,
      missing_sequences`` (lgg-mri's column names; empty = unknown), one row per exported case.

    Slice stacks (layout ``slices``, lgg-mri) keep every slice, and their values unchanged (a
    128 x 128 source is copied exactly). 3D volumes (layout ``volume``) keep the axial slices with
    brain (at least ``BRAIN_SLICE_FRACTION`` of the pixels non-zero in some sequence; all slices if
    none qualifies), zero-padded to a centred square and resized to ``size`` x ``size`` (linear
    for images, nearest for the mask); the in-plane spacing is scaled accordingly. Intensities are
    as stored (normalisation is the reader's job). Deterministic: byte-identical files for the
    same lake; npz files of cases no longer in the manifest are removed. Returns an index
    (patient_id, source, n_slices, present, has_mask, path, sha256)."""
    from ml.data.volume import read_nifti

    lake, out = Path(lake_dir), Path(out_dir)
    pdir = out / "patients"
    pdir.mkdir(parents=True, exist_ok=True)
    index = []
    ids = sorted(manifest["patient_id"].unique()) if len(manifest) else []
    for pid in ids:
        rows = manifest[manifest["patient_id"] == pid].sort_values("sequence")
        vols = {r["sequence"]: read_nifti(lake / r["path"]) for r in rows.to_dict("records")}
        layout = str(rows["layout"].iloc[0])
        spacing_known = bool(rows["spacing_known"].all())
        ref = next(iter(vols.values()))
        n = ref.array.shape[0]
        present = np.array([s in vols for s in SEQUENCES], bool)
        keep = np.arange(n)
        if layout == "volume":
            brain = np.zeros(ref.array.shape, bool)
            for s in SEQUENCES:
                if s in vols:
                    brain |= vols[s].array != 0
            frac = brain.reshape(n, -1).mean(axis=1)
            if (frac >= BRAIN_SLICE_FRACTION).any():
                keep = np.flatnonzero(frac >= BRAIN_SLICE_FRACTION)
        h, w = ref.array.shape[1:]
        image = np.zeros((len(keep), len(SEQUENCES), size, size), np.float32)
        for c, s in enumerate(SEQUENCES):
            if s in vols:
                image[:, c] = _square_resize(vols[s].array[keep].astype(np.float32), size, order=1)
        arrays = {
            "image": image,
            "present": present,
            "slice_index": (keep + 1).astype(np.int16),
            "sequences": np.array(SEQUENCES),
        }
        scale = max(h, w) / size
        sx, sy, sz = ref.spacing
        arrays["spacing"] = (
            np.array([sy * scale, sx * scale, sz], np.float64) if spacing_known else np.full(3, np.nan, np.float64)
        )
        if "seg" in vols:
            seg = (vols["seg"].array[keep] > 0).astype(np.uint8)
            arrays["mask"] = _square_resize(seg, size, order=0).astype(np.uint8)
        data = save_npz_deterministic(pdir / f"{pid}.npz", arrays)
        index.append(
            {
                "patient_id": pid,
                "source": str(rows["source"].iloc[0]),
                "n_slices": len(keep),
                "present": ";".join(s for s, p in zip(SEQUENCES, present, strict=True) if p),
                "has_mask": "mask" in arrays,
                "path": f"patients/{pid}.npz",
                "sha256": sha256_bytes(data),
            }
        )
    for p in sorted(pdir.glob("*.npz")):
        if p.stem not in set(ids):
            p.unlink()
    lab = labels.set_index("patient_id") if len(labels) else pd.DataFrame()
    csv_rows = []
    for pid in ids:
        row = lab.loc[pid] if pid in lab.index else None
        csv_rows.append(
            {
                "patient_id": pid,
                **{
                    LABEL_COLUMNS[t]: "" if row is None or pd.isna(row[t]) else str(row[t])
                    for t in TASKS  # histology, grade, idh_status, codeletion_1p19q
                },
                "missing_sequences": ""
                if row is None or pd.isna(row["missing_sequences"])
                else row["missing_sequences"],
            }
        )
    cols = ["patient_id", *(LABEL_COLUMNS[t] for t in TASKS), "missing_sequences"]
    atomic_write_text(out / "labels.csv", pd.DataFrame(csv_rows, columns=cols).to_csv(index=False, lineterminator="\n"))
    return pd.DataFrame(index, columns=["patient_id", "source", "n_slices", "present", "has_mask", "path", "sha256"])
