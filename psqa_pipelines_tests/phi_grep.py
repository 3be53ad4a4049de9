"""A deep grep for planted PHI: looks *inside* compressed and structured files too.

A plain ``grep`` on Parquet (zstd), ``.nii.gz``, ``.npz`` or SQLite pages can miss strings
that are stored compressed, which would make a PHI test pass for the wrong reason. Every file
is searched as raw bytes and, by type, also as: gunzipped bytes, every zip member, every
Parquet cell (plus schema metadata), and every SQLite row (``iterdump``).
"""

from __future__ import annotations

import gzip
import io
import sqlite3
import zipfile
from pathlib import Path


def _texts(path: Path):
    data = path.read_bytes()
    yield data
    name = path.name.lower()
    if data[:2] == b"\x1f\x8b":
        try:
            yield gzip.decompress(data)
        except OSError:
            pass
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for member in zf.namelist():
                    yield zf.read(member)
        except zipfile.BadZipFile:
            pass
    if name.endswith(".parquet") or data[:4] == b"PAR1":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            yield str(table.schema.metadata or "").encode()
            for col in table.columns:
                yield "\n".join(str(v) for v in col.to_pylist()).encode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - not a readable parquet file
            pass
    if data[:16] == b"SQLite format 3\x00":
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                yield "\n".join(con.iterdump()).encode("utf-8", "replace")
            finally:
                con.close()
        except sqlite3.Error:
            pass


def find_phi(
    root: str | Path, needles: list[str], exclude: tuple[str, ...] = ("inbox", "quarantine")
) -> list[tuple[str, str]]:
    """(relative path, needle) for every planted string found under ``root``.

    Matching is case-insensitive; file *names* are searched too.
    """
    root = Path(root)
    low = [n.lower().encode() for n in needles if n]
    hits = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in exclude:
            continue
        for needle in low:
            if needle in str(rel).lower().encode():
                hits.append((str(rel), needle.decode()))
        if not path.is_file():
            continue
        for text in _texts(path):
            t = text.lower()
            for needle in low:
                if needle in t:
                    hits.append((str(rel), needle.decode()))
    return sorted(set(hits))
