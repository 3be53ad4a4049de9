"""Atomic, deterministic file writes and hashing.

Every file the pipeline stores goes through these helpers: data is written to a temporary
file in the destination folder and renamed into place (``os.replace`` is atomic on POSIX),
so a reader never sees a half-written file and a killed run never leaves one behind.
Writers are deterministic (no timestamps in Parquet or gzip headers) so that re-running a
step on unchanged inputs gives byte-identical outputs.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "gzip_bytes",
    "json_safe",
    "read_parquet",
    "save_npz_deterministic",
    "sha256_bytes",
    "sha256_file",
    "write_parquet_atomic",
]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it onto ``dest``.

    The temporary name keeps ``suffix`` (e.g. ``.nii.gz``) so writers that choose a format
    by extension keep working. On error the temporary file is removed and ``dest`` is
    untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def gzip_bytes(data: bytes, level: int = 1) -> bytes:
    """Deterministic gzip (mtime=0, no file name in the header)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level, mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()


def write_parquet_atomic(dest: str | os.PathLike, table_or_df: Any, schema: Any = None) -> Path:
    """Write a pandas DataFrame or pyarrow Table to Parquet atomically and deterministically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(table_or_df, pa.Table):
        table = table_or_df if schema is None else table_or_df.cast(schema)
    else:
        table = pa.Table.from_pandas(table_or_df, schema=schema, preserve_index=False)
    # pandas metadata embeds nothing time-dependent, but drop it anyway for portability and
    # so that identical data always gives identical bytes.
    table = table.replace_schema_metadata(None)
    with atomic_path(dest, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
    return Path(dest)


def read_parquet(path: str | os.PathLike) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pandas()


def json_safe(obj: Any) -> Any:
    """NaN / inf -> None throughout, numpy scalars -> Python numbers (strict JSON: a report with a
    missing value, or a run stopped before its first epoch, has null where a number is absent)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_npz_deterministic(path: str | os.PathLike, arrays: dict[str, Any]) -> bytes:
    """``np.savez_compressed`` with fixed zip timestamps (byte-identical for equal arrays)."""
    import zipfile

    import numpy as np

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name in sorted(arrays):
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr_buf.getvalue())
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return data
