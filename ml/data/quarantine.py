"""Quarantine: bad input is kept, explained and counted, never dropped.

Layout::

    <quarantine_dir>/<sha[:2]>/<sha256>/<original file name>   the file itself (moved or copied)
    <quarantine_dir>/<sha[:2]>/<sha256>/record.json            original relative path, reason,
                                                               parser error text, times
    <lake>/quarantine_log/<study or batch>/<run id>.parquet    PHI-free rows (sha256, reason, ...)

The quarantine folder is PHI territory like the inbox (original names, raw error texts); the
Parquet log in the lake holds only the reason code, our own detail text, the content hash and
the pseudonymous study key. Files from a read-only source (the shared OpenKBP folder) are
copied instead of moved.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ml.data.dicom.headers import REASONS
from ml.utils.io import atomic_path, atomic_write_json, sha256_file, write_parquet_atomic

__all__ = ["QUARANTINE_COLUMNS", "Quarantine", "QuarantineRecord", "read_log", "records_frame", "utc_now", "write_log"]

QUARANTINE_COLUMNS = [
    "study_key",
    "sha256",
    "size_bytes",
    "reason",
    "detail",
    "source",
    "action",
    "quarantine_ref",
    "quarantined_at",
]


@dataclass
class QuarantineRecord:
    study_key: str
    sha256: str
    size_bytes: int
    reason: str
    detail: str
    source: str  # dicom | nifti | openkbp | unknown
    action: str  # moved | copied
    quarantine_ref: str  # "<sha[:2]>/<sha>" inside the quarantine folder
    quarantined_at: str  # ISO-8601 UTC


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


class Quarantine:
    def __init__(self, quarantine_dir: str | os.PathLike) -> None:
        self.dir = Path(quarantine_dir)

    def put(
        self,
        path: str | os.PathLike,
        *,
        reason: str,
        detail: str = "",
        study_key: str = "",
        source: str = "unknown",
        move: bool = True,
        relpath: str = "",
        raw_error: str = "",
        sha256: str | None = None,
    ) -> QuarantineRecord:
        """Move (or copy) one file into quarantine and return its PHI-free record."""
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        src = Path(path)
        digest = sha256 or sha256_file(src)
        size = src.stat().st_size
        ref = f"{digest[:2]}/{digest}"
        dest_dir = self.dir / ref
        dest = dest_dir / src.name
        dest_dir.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
        now = utc_now()
        atomic_write_json(
            dest_dir / "record.json",
            {
                "sha256": digest,
                "original_relpath": relpath or src.name,
                "reason": reason,
                "reason_text": REASONS[reason],
                "detail": detail,
                "raw_error": raw_error,
                "study_key": study_key,
                "source": source,
                "quarantined_at": now,
            },
        )
        action = "copied"
        if move:
            # the copy is in place (renamed atomically): only now remove the original
            src.unlink()
            action = "moved"
        return QuarantineRecord(
            study_key=study_key,
            sha256=digest,
            size_bytes=size,
            reason=reason,
            detail=detail,
            source=source,
            action=action,
            quarantine_ref=ref,
            quarantined_at=now,
        )


def records_frame(records: list[QuarantineRecord]) -> pd.DataFrame:
    if not records:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "size_bytes" else "str") for c in QUARANTINE_COLUMNS})
    return pd.DataFrame([asdict(r) for r in records], columns=QUARANTINE_COLUMNS)


def write_log(log_dir: str | os.PathLike, batch: str, run_id: str, records: list[QuarantineRecord]) -> Path | None:
    """Append one Parquet fragment (one per run and study/batch) to the quarantine log."""
    if not records:
        return None
    dest = Path(log_dir) / batch / f"{run_id}.parquet"
    write_parquet_atomic(dest, records_frame(records))
    return dest


def read_log(log_dir: str | os.PathLike) -> pd.DataFrame:
    """All fragments of the quarantine log, oldest first; empty frame when none."""
    root = Path(log_dir)
    frames = [pd.read_parquet(p) for p in sorted(root.glob("*/*.parquet"))] if root.exists() else []
    if not frames:
        return records_frame([])
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["quarantined_at", "sha256"], kind="stable").reset_index(drop=True)
