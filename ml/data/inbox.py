"""Scanning a landing folder and grouping its files into studies.

A *study* is the unit of ingestion (one Dagster dynamic partition):

* DICOM files are grouped by StudyInstanceUID (read from the header only);
* NIfTI files (``.nii``/``.nii.gz``) by their parent folder (the BraTS layout is one folder
  per case);
* an OpenKBP patient folder (``ct.csv[.xz|.gz]`` + ``dose`` / ``possible_dose_mask`` /
  ``voxel_dimensions`` files) is one study.

Study keys are keyed-hash pseudonyms (``dcm-…``, ``nii-…``, ``kbp-…``); nothing from the
file system or the headers leaves this module except through them. Files that cannot be
attributed to a study (not DICOM, unreadable, no StudyInstanceUID) are returned separately so
that a triage step can quarantine them.

Header reads are cached in ``<root>/.psqa_index/scan_cache.json`` keyed by (relative path,
size, mtime): that file holds relative paths, which may contain PHI, so it lives inside the
landing folder (which is PHI territory anyway) and never in the lake.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ml.data.dicom.deid import Pseudonymizer
from ml.utils.io import atomic_write_text

__all__ = [
    "INDEX_DIR",
    "QA_RESULTS_COLUMNS",
    "FileRef",
    "InboxScan",
    "SourceScan",
    "StudyGroup",
    "fileref_to_dict",
    "fingerprint",
    "is_qa_results_csv",
    "read_receipt",
    "scan_landing_folder",
    "scan_sources",
    "scan_summary",
    "write_receipt",
]

INDEX_DIR = ".psqa_index"
_OPENKBP_CT = re.compile(r"^ct\.csv(\.xz|\.gz)?$")
_OPENKBP_MARKERS = ("dose", "possible_dose_mask", "voxel_dimensions")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_HEADER_TAGS = ["StudyInstanceUID", "SOPClassUID", "Modality", "SOPInstanceUID"]


@dataclass(frozen=True)
class FileRef:
    relpath: str  # relative to the scanned root (may contain PHI: never store outside the inbox)
    size: int
    mtime_ns: int
    kind: str  # dicom | nifti | openkbp | unknown
    modality: str = ""
    detail: str = ""  # for unattributable files: why

    def signature(self) -> str:
        return f"{self.relpath}|{self.size}|{self.mtime_ns}"


@dataclass
class StudyGroup:
    key: str
    source: str  # dicom | nifti | openkbp
    root: Path
    files: list[FileRef] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.files)

    def paths(self) -> list[Path]:
        return [self.root / f.relpath for f in self.files]


@dataclass
class InboxScan:
    root: Path
    studies: dict[str, StudyGroup]
    unattributed: list[FileRef]
    unsettled: int = 0  # files skipped because they are still being written
    qa_tables: list[FileRef] = field(default_factory=list)  # QA-system result exports (CSV)

    @property
    def n_files(self) -> int:
        return sum(len(s.files) for s in self.studies.values()) + len(self.unattributed) + len(self.qa_tables)


def fingerprint(files: list[FileRef]) -> str:
    h = hashlib.sha256()
    for sig in sorted(f.signature() for f in files):
        h.update(sig.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:20]


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            yield Path(dirpath) / name


def _is_openkbp_dir(names: set[str]) -> bool:
    has_ct = any(_OPENKBP_CT.match(n) for n in names)
    has_marker = any(n.split(".")[0] in _OPENKBP_MARKERS for n in names)
    return has_ct or (has_marker and any(n.endswith((".csv", ".csv.xz", ".csv.gz")) for n in names))


class _HeaderCache:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def get(self, sig: str) -> dict | None:
        return self.entries.get(sig)

    def put(self, sig: str, value: dict) -> None:
        self.entries[sig] = value
        self.dirty = True

    def save(self, live: set[str]) -> None:
        if self.path is None:
            return
        stale = set(self.entries) - live
        if stale:
            for s in stale:
                del self.entries[s]
            self.dirty = True
        if self.dirty:
            try:
                atomic_write_text(self.path, json.dumps(self.entries, sort_keys=True))
            except OSError:
                pass  # read-only landing folder: the cache is an optimisation only


QA_RESULTS_COLUMNS = ("PatientID", "PlanSOPInstanceUID", "BeamNumber", "Criterion", "GPR")


def is_qa_results_csv(path: Path) -> bool:
    """A QA system's results export: a CSV whose header names the QA result columns."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline()
    except OSError:
        return False
    cols = {c.strip().strip('"') for c in header.split(",")}
    return all(c in cols for c in QA_RESULTS_COLUMNS)


def _dicom_header(path: Path) -> dict:
    from ml.data.dicom.headers import IngestError, read_dataset

    try:
        ds = read_dataset(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except IngestError as exc:
        return {"ok": False, "reason": exc.reason}
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not study:
        return {"ok": False, "reason": "missing_required_tags"}
    return {"ok": True, "study_uid": study, "modality": str(ds.get("Modality", "") or "")}


def scan_landing_folder(
    root: str | os.PathLike,
    pseudonymizer: Pseudonymizer,
    *,
    settle_seconds: float = 0.0,
    use_cache: bool = True,
) -> InboxScan:
    """Group every file under ``root`` into studies (see module docstring)."""
    root = Path(root)
    studies: dict[str, StudyGroup] = {}
    unattributed: list[FileRef] = []
    qa_tables: list[FileRef] = []
    unsettled = 0
    if not root.exists():
        return InboxScan(root, studies, unattributed)
    cache = _HeaderCache(root / INDEX_DIR / "scan_cache.json" if use_cache else None)
    live: set[str] = set()
    now_ns = time.time_ns()
    openkbp_dirs: dict[Path, bool] = {}

    def add(key: str, source: str, ref: FileRef) -> None:
        group = studies.get(key)
        if group is None:
            group = studies[key] = StudyGroup(key=key, source=source, root=root)
        group.files.append(ref)

    for path in _walk(root):
        try:
            st = path.stat()
        except OSError:
            continue
        if settle_seconds and now_ns - st.st_mtime_ns < settle_seconds * 1e9:
            unsettled += 1
            continue
        rel = path.relative_to(root).as_posix()
        parent = path.parent
        if parent not in openkbp_dirs:
            try:
                openkbp_dirs[parent] = _is_openkbp_dir({p.name for p in parent.iterdir() if p.is_file()})
            except OSError:
                openkbp_dirs[parent] = False
        if openkbp_dirs[parent]:
            key = pseudonymizer.study("kbp", parent.name)
            add(key, "openkbp", FileRef(rel, st.st_size, st.st_mtime_ns, "openkbp"))
            continue
        if _NIFTI.search(path.name):
            folder = parent.relative_to(root).as_posix()
            key = pseudonymizer.study("nii", folder)
            add(key, "nifti", FileRef(rel, st.st_size, st.st_mtime_ns, "nifti", "MR"))
            continue
        if path.suffix.lower() == ".csv" and is_qa_results_csv(path):
            qa_tables.append(FileRef(rel, st.st_size, st.st_mtime_ns, "qa_results"))
            continue
        ref = FileRef(rel, st.st_size, st.st_mtime_ns, "unknown")
        sig = ref.signature()
        live.add(sig)
        info = cache.get(sig)
        if info is None:
            info = _dicom_header(path)
            cache.put(sig, info)
        if info.get("ok"):
            key = pseudonymizer.study("dcm", info["study_uid"])
            add(key, "dicom", FileRef(rel, st.st_size, st.st_mtime_ns, "dicom", info.get("modality", "")))
        else:
            unattributed.append(FileRef(rel, st.st_size, st.st_mtime_ns, "unknown", detail=info.get("reason", "")))
    cache.save(live)
    return InboxScan(root, studies, unattributed, unsettled, qa_tables)


def scan_summary(scan: InboxScan) -> dict:
    """PHI-free summary (counts per source) for logs and metadata."""
    by_source: dict[str, int] = {}
    for g in scan.studies.values():
        by_source[g.source] = by_source.get(g.source, 0) + 1
    return {
        "studies": len(scan.studies),
        "studies_by_source": by_source,
        "files": scan.n_files,
        "unattributed_files": len(scan.unattributed),
        "unsettled_files": scan.unsettled,
        "qa_result_tables": len(scan.qa_tables),
    }


# ---------------------------------------------------------------------------------------
# receipts: what a finished ingestion left in the landing folder for each study
# ---------------------------------------------------------------------------------------
def write_receipt(state_dir: str | os.PathLike, study_key: str, fingerprint_after: str, **extra: object) -> None:
    """Record the study's fingerprint after ingestion (quarantine moves change it), so the
    sensor does not request a second run for a study whose only change was our own move."""
    payload = {"study_key": study_key, "fingerprint_after": fingerprint_after, **extra}
    atomic_write_text(Path(state_dir) / "receipts" / f"{study_key}.json", json.dumps(payload, sort_keys=True))


def read_receipt(state_dir: str | os.PathLike, study_key: str) -> dict | None:
    p = Path(state_dir) / "receipts" / f"{study_key}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def fileref_to_dict(ref: FileRef) -> dict:
    return asdict(ref)


@dataclass
class SourceScan:
    """Scans of several landing folders (the inbox, the OpenKBP folder...)."""

    scans: dict[str, InboxScan]  # source name -> scan
    writable: dict[str, bool]

    @property
    def studies(self) -> dict[str, tuple[str, StudyGroup]]:
        """study key -> (source name, group); the first source wins on a key collision."""
        out: dict[str, tuple[str, StudyGroup]] = {}
        for name, scan in self.scans.items():
            for key, group in scan.studies.items():
                out.setdefault(key, (name, group))
        return out

    def summary(self) -> dict:
        return {name: scan_summary(scan) for name, scan in self.scans.items()}


def scan_sources(
    sources: list[tuple[str, Path, bool]], pseudonymizer: Pseudonymizer, settle_seconds: float = 0.0
) -> SourceScan:
    scans, writable = {}, {}
    for name, root, can_write in sources:
        scans[name] = scan_landing_folder(root, pseudonymizer, settle_seconds=settle_seconds, use_cache=can_write)
        writable[name] = can_write
    return SourceScan(scans, writable)
