"""Where state lives, and every environment variable the Dagster layer reads.

This module is the only reader of the environment in ``psqa_pipelines`` (a test enforces it);
everything else calls the functions below. Each variable, its default and its meaning is listed
once, in ``ENV_SETTINGS``.

One root, ``PSQA_HOME``, with a fixed layout below it::

    $PSQA_HOME/
      dagster/      DAGSTER_HOME (instance config, SQLite run/event storage, compute logs)
      mlflow/       mlflow.db (SQLite tracking + registry) and artifacts/
      lake/         tables/ (Parquet via the IO manager), studies/ (de-identified copies),
                    volumes/ (NIfTI), quarantine_log/ (PHI-free Parquet fragments), state/
      inbox/        landing folder watched by the sensor (identified data!)
      quarantine/   rejected files and their records (identified data!)

Defaults: ``PSQA_HOME`` or ``<checkout>/.psqa``; every sub-path can be overridden through
the ``PsqaStorage`` resource config or its environment variables (``PSQA_LAKE_DIR``,
``PSQA_INBOX_DIR``, ``PSQA_QUARANTINE_DIR``, ``PSQA_OPENKBP_DIR``); the glioma sources are
``PSQA_LGG_DIR`` and ``PSQA_BRAIN_MRI_DIR`` (read-only shared datasets).

Values are read when a function is called, not at import: a test or a launcher that changes
the environment is seen by the next call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


@dataclass(frozen=True)
class EnvSetting:
    """One environment variable: its name, its documented default and what it controls.

    ``empty_is_unset``: an empty value counts as not set (the default applies); otherwise an
    empty value is a value (``PSQA_OPENKBP_DIR=""`` switches the OpenKBP source off)."""

    name: str
    default: str
    description: str
    empty_is_unset: bool = True

    def raw(self) -> str | None:
        """The value as set, or None when unset (or empty, where empty means unset)."""
        value = os.environ.get(self.name)
        if value is None or (self.empty_is_unset and value == ""):
            return None
        return value

    def get(self) -> str:
        value = self.raw()
        return self.default if value is None else value


PSQA_HOME = EnvSetting("PSQA_HOME", "<checkout>/.psqa", "root of all pipeline state")
PSQA_LAKE_DIR = EnvSetting("PSQA_LAKE_DIR", "$PSQA_HOME/lake", "the lake (tables, studies, volumes)")
PSQA_INBOX_DIR = EnvSetting("PSQA_INBOX_DIR", "$PSQA_HOME/inbox", "landing folder watched by the sensor")
PSQA_QUARANTINE_DIR = EnvSetting("PSQA_QUARANTINE_DIR", "$PSQA_HOME/quarantine", "rejected files")
PSQA_OPENKBP_DIR = EnvSetting(
    "PSQA_OPENKBP_DIR",
    "off",
    "OpenKBP patient folders (read-only source watched by inbox_sensor; opt-in: the shared 169 patients are "
    "about an hour of ingestion on 2 cores); `shared` = ../shared/datasets/openkbp/train-pats beside the checkout",
    empty_is_unset=False,
)
PSQA_LGG_DIR = EnvSetting(
    "PSQA_LGG_DIR",
    "../shared/datasets/lgg-mri beside the checkout, if present",
    "lgg-mri glioma patients (patients/*.npz + labels.csv; read-only source); empty = off",
    empty_is_unset=False,
)
PSQA_BRAIN_MRI_DIR = EnvSetting(
    "PSQA_BRAIN_MRI_DIR",
    "../shared/datasets/brain-mri-samples beside the checkout, if present",
    "3D brain MRI cases (BraTS/TCGA NIfTI folders; read-only source of the glioma lake); empty = off",
    empty_is_unset=False,
)
PSQA_DEID_SECRET = EnvSetting("PSQA_DEID_SECRET", "", "HMAC key of the pseudonyms; unset = the documented dev secret")
MLFLOW_TRACKING_URI = EnvSetting(
    "MLFLOW_TRACKING_URI", "sqlite:///$PSQA_HOME/mlflow/mlflow.db", "MLflow tracking (and registry) store"
)
DAGSTER_HOME = EnvSetting("DAGSTER_HOME", "$PSQA_HOME/dagster", "Dagster instance folder", empty_is_unset=False)
MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR = EnvSetting(
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    "false",
    "MLflow's artifact up/download progress bars (off here: one per logged model flooded the console)",
)
MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT = EnvSetting(
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
    "true",
    "MLflow's two 'View run / View experiment' lines per run on a tracking server (off here: the asset metadata "
    "links the run)",
)
PSQA_RETRAIN_CRON = EnvSetting(
    "PSQA_RETRAIN_CRON", "0 2 * * 1", "cron of psqa_retrain_schedule (Monday 02:00)", empty_is_unset=False
)
PSQA_RETRAIN_MIN_NEW_PLANS = EnvSetting(
    "PSQA_RETRAIN_MIN_NEW_PLANS",
    "20",
    "new labelled plans needed before the schedule retrains BMMQA",
    empty_is_unset=False,
)

PSQA_PROFILE = EnvSetting(
    "PSQA_PROFILE",
    "local",
    "deployment profile: local (SQLite Dagster + MLflow under PSQA_HOME, what make demo uses) | team (Dagster "
    "on PostgreSQL, MLflow tracking server) | cluster (team + distributed executor)",
)
PSQA_PG_URL = EnvSetting(
    "PSQA_PG_URL",
    "postgresql://psqa@127.0.0.1:5433",
    "team/cluster: the PostgreSQL server (databases dagster and mlflow on it); no password here (libpq reads "
    "PGPASSWORD or ~/.pgpass); `psqa team up` runs a local one on this port",
)
PSQA_MLFLOW_URL = EnvSetting(
    "PSQA_MLFLOW_URL",
    "http://127.0.0.1:5001",
    "team/cluster: the MLflow tracking server (`psqa team up` runs one on this port); MLFLOW_TRACKING_URI wins",
)

ENV_SETTINGS: tuple[EnvSetting, ...] = (
    PSQA_HOME,
    PSQA_LAKE_DIR,
    PSQA_INBOX_DIR,
    PSQA_QUARANTINE_DIR,
    PSQA_OPENKBP_DIR,
    PSQA_LGG_DIR,
    PSQA_BRAIN_MRI_DIR,
    PSQA_DEID_SECRET,
    MLFLOW_TRACKING_URI,
    DAGSTER_HOME,
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
    PSQA_RETRAIN_CRON,
    PSQA_RETRAIN_MIN_NEW_PLANS,
    PSQA_PROFILE,
    PSQA_PG_URL,
    PSQA_MLFLOW_URL,
)

PROFILES = ("local", "team", "cluster")


def profile() -> str:
    """``PSQA_PROFILE`` (local | team | cluster); anything else is an error, not a silent default."""
    value = PSQA_PROFILE.get().strip().lower()
    if value not in PROFILES:
        raise ValueError(f"PSQA_PROFILE={value!r}: expected one of {', '.join(PROFILES)}")
    return value


def use_profile(name: str) -> None:
    """Set ``PSQA_PROFILE`` for this process and its children (``psqa team up`` means team)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}")
    os.environ[PSQA_PROFILE.name] = name


def team_pg_url() -> str:
    """The team PostgreSQL server URL, without database; refuses an embedded password."""
    from urllib.parse import urlsplit

    url = PSQA_PG_URL.get()
    if urlsplit(url).password:
        raise ValueError("PSQA_PG_URL carries a password: keep it out of URLs and files (PGPASSWORD or ~/.pgpass)")
    return url.rstrip("/")


def team_mlflow_url() -> str:
    return PSQA_MLFLOW_URL.get().rstrip("/")


# -- locations -------------------------------------------------------------------------------
def default_home() -> Path:
    env = PSQA_HOME.raw()
    if env:
        return Path(env).expanduser().resolve()
    if (REPO_DIR / "pyproject.toml").exists():
        return REPO_DIR / ".psqa"
    return Path.cwd() / ".psqa"


def shared_openkbp_dir() -> Path:
    """The 169 real OpenKBP patients of ``../shared`` beside the checkout (may be absent)."""
    return REPO_DIR.parent / "shared" / "datasets" / "openkbp" / "train-pats"


def default_openkbp_dir() -> str:
    """The OpenKBP source is opt-in: empty (off) unless ``PSQA_OPENKBP_DIR`` is set -- to a folder
    of ``pt_*`` patients, or to ``shared`` for :func:`shared_openkbp_dir` (empty when absent).
    ``make dev`` would otherwise queue about an hour of ingestion nobody asked for."""
    env = PSQA_OPENKBP_DIR.raw()
    if env is None or env in ("", "off"):
        return ""
    if env == "shared":
        return str(shared_openkbp_dir()) if shared_openkbp_dir().is_dir() else ""
    return env


def _shared_dataset_dir(setting: EnvSetting, name: str) -> str:
    env = setting.raw()
    if env is not None:
        return env
    candidate = REPO_DIR.parent / "shared" / "datasets" / name
    return str(candidate) if candidate.is_dir() else ""


def default_lgg_dir() -> str:
    """``PSQA_LGG_DIR``, else ``../shared/datasets/lgg-mri`` beside the checkout when it exists,
    else empty (the source is then off)."""
    return _shared_dataset_dir(PSQA_LGG_DIR, "lgg-mri")


def default_brain_mri_dir() -> str:
    """``PSQA_BRAIN_MRI_DIR``, else ``../shared/datasets/brain-mri-samples`` beside the checkout
    when it exists, else empty (the source is then off)."""
    return _shared_dataset_dir(PSQA_BRAIN_MRI_DIR, "brain-mri-samples")


def storage_dir_override(kind: str) -> Path | None:
    """``PSQA_LAKE_DIR`` / ``PSQA_INBOX_DIR`` / ``PSQA_QUARANTINE_DIR`` for kind lake / inbox /
    quarantine, or None when unset (the storage resource then uses ``<home>/<kind>``)."""
    setting = {"lake": PSQA_LAKE_DIR, "inbox": PSQA_INBOX_DIR, "quarantine": PSQA_QUARANTINE_DIR}[kind]
    value = setting.raw()
    return Path(value).expanduser() if value else None


def dagster_home(home: Path) -> Path:
    """``DAGSTER_HOME`` when set (non-empty), else ``<home>/dagster``."""
    value = DAGSTER_HOME.raw()
    return Path(value) if value else home / "dagster"  # empty = unset


def child_env(**overrides: str) -> dict[str, str]:
    """This process's environment plus ``overrides``, for servers started as child processes."""
    return dict(os.environ, **overrides)


# -- MLflow ----------------------------------------------------------------------------------
def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``; else the tracking server (``PSQA_MLFLOW_URL``) in the team and
    cluster profiles; else SQLite under ``$PSQA_HOME/mlflow/mlflow.db``."""
    env = MLFLOW_TRACKING_URI.raw()
    if env:
        return env
    if profile() != "local":
        return team_mlflow_url()
    return f"sqlite:///{default_home() / 'mlflow' / 'mlflow.db'}"


def mlflow_ui_url() -> str:
    """Where a reader opens MLflow: ``make dev``'s UI (local profile) or the tracking server."""
    return "http://127.0.0.1:5000" if profile() == "local" else team_mlflow_url()


def mlflow_artifact_root() -> str:
    return str(default_home() / "mlflow" / "artifacts")


def quiet_mlflow_progress_bars() -> None:
    """MLflow reads ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` from the environment at every transfer;
    unless the user set it, it is set to the documented default (false) for this process."""
    for setting in (MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT):
        if setting.raw() is None:
            os.environ[setting.name] = setting.default


# -- de-identification -----------------------------------------------------------------------
def deid_secret_config():
    """The ``secret`` config of ``DeidentificationResource``: ``dg.EnvVar("PSQA_DEID_SECRET")``
    when the variable is set (Dagster resolves it, and the UI shows the variable's name, never
    the key), else "" (the documented development secret, with a warning at ingestion)."""
    import dagster as dg

    return dg.EnvVar(PSQA_DEID_SECRET.name) if PSQA_DEID_SECRET.raw() else ""


# -- PSQA retraining -------------------------------------------------------------------------
def retrain_cron() -> str:
    """Cron of ``psqa_retrain_schedule`` (``PSQA_RETRAIN_CRON``, default Monday 02:00)."""
    return PSQA_RETRAIN_CRON.get()


def retrain_min_new_plans() -> int:
    """New labelled plans needed before the schedule retrains (``PSQA_RETRAIN_MIN_NEW_PLANS``, 20)."""
    return int(PSQA_RETRAIN_MIN_NEW_PLANS.get())
