"""Shared fixtures: an isolated PSQA_HOME per test, pre-generated sample studies, definitions."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OPENKBP_DIR = SHARED / "datasets" / "openkbp" / "train-pats"
BRAIN_DIR = SHARED / "datasets" / "brain-mri-samples"

needs_openkbp = pytest.mark.skipif(not OPENKBP_DIR.is_dir(), reason="needs ../shared OpenKBP data (absent)")
needs_brain = pytest.mark.skipif(not BRAIN_DIR.is_dir(), reason="needs ../shared brain MRI samples (absent)")

# small but complete studies: 34 files each (32 CT slices + RTSTRUCT + RTDOSE)
#: BMMQA training config small enough for tests (a pipeline check, not a model)
PSQA_TINY_TRAINING = {
    "epochs": 3,
    "batch_size": 8,
    "patience": 50,
    "warmup_epochs": 1,
    "enc_widths": [4, 8, 8, 8],
    "dec_widths": [4, 4, 4, 4],
}
SMALL_STUDY = dict(matrix=64, pixel_spacing_mm=6.0, n_slices=32, slice_thickness_mm=6.0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory):
    """Never touch the checkout's .psqa or a user's MLflow server from tests."""
    home = tmp_path_factory.mktemp("psqa_home_default")
    saved = {
        k: os.environ.get(k)
        for k in ("PSQA_HOME", "DAGSTER_HOME", "MLFLOW_TRACKING_URI", "PSQA_OPENKBP_DIR", "PSQA_DEID_SECRET")
    }
    os.environ["PSQA_HOME"] = str(home)
    os.environ["PSQA_OPENKBP_DIR"] = ""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("PSQA_DEID_SECRET", None)
    os.environ.pop("DAGSTER_HOME", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def sample_cohort(tmp_path_factory: pytest.TempPathFactory):
    """Two small generated H&N studies (with planted PHI), generated once per session."""
    from ml.data.synthetic import generate_hn_cohort

    root = tmp_path_factory.mktemp("cohort")
    truths = generate_hn_cohort(root, 2, seed=11, **SMALL_STUDY)
    return root, truths


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """A pre-initialised SQLite MLflow store shared by the session (first migration ~5 s)."""
    from psqa_pipelines.resources import MlflowResource

    root = tmp_path_factory.mktemp("mlflow")
    res = MlflowResource(
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}", artifact_root=str(root / "artifacts"), experiment="psqa-tests"
    )
    res.ensure_store()
    return res


@pytest.fixture
def storage(tmp_path: Path):
    from psqa_pipelines.resources import PsqaStorage

    return PsqaStorage(home=str(tmp_path / "psqa"), openkbp_dir="", inbox_settle_seconds=0)


@pytest.fixture
def make_defs(mlflow_store):
    from psqa_pipelines.definitions import build_defs, build_resources

    def _make(storage):
        return build_defs(build_resources(storage, mlflow=mlflow_store))

    return _make


@pytest.fixture
def instance():
    import dagster as dg

    with dg.instance_for_test() as inst:
        yield inst


def copy_into(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return dest
