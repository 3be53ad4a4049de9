"""Where state lives: one root, ``PSQA_HOME``, with a fixed layout below it.

::

    $PSQA_HOME/
      dagster/      DAGSTER_HOME (instance config, SQLite run/event storage, compute logs)
      mlflow/       mlflow.db (SQLite tracking + registry) and artifacts/
      lake/         tables/ (Parquet via the IO manager), studies/ (de-identified copies),
                    volumes/ (NIfTI), quarantine_log/ (PHI-free Parquet fragments), state/
      inbox/        landing folder watched by the sensor (identified data!)
      quarantine/   rejected files and their records (identified data!)

Defaults: ``PSQA_HOME`` or ``<checkout>/.psqa``; every sub-path can be overridden through
the ``PsqaStorage`` resource config or its environment variables (``PSQA_LAKE_DIR``,
``PSQA_INBOX_DIR``, ``PSQA_QUARANTINE_DIR``, ``PSQA_OPENKBP_DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def default_home() -> Path:
    env = os.environ.get("PSQA_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_DIR / "pyproject.toml").exists():
        return REPO_DIR / ".psqa"
    return Path.cwd() / ".psqa"


def default_openkbp_dir() -> str:
    """``PSQA_OPENKBP_DIR``, else ``../shared/datasets/openkbp/train-pats`` beside the checkout
    when it exists, else empty (the OpenKBP source is then off)."""
    env = os.environ.get("PSQA_OPENKBP_DIR")
    if env is not None:
        return env
    candidate = REPO_DIR.parent / "shared" / "datasets" / "openkbp" / "train-pats"
    return str(candidate) if candidate.is_dir() else ""


def env_path(name: str, default: Path) -> str:
    value = os.environ.get(name)
    return str(Path(value).expanduser()) if value else str(default)
