"""The team profile with real servers started by the test: PostgreSQL (initdb + pg_ctl, as an
unprivileged user when root) holds Dagster's runs, events and schedules and MLflow's store; an
MLflow tracking server proxies the artifacts. The PSQA slice runs on it: simulated plans in the
inbox -> ingestion and plan-QA runs (two worker processes at once) -> lake tables -> BMMQA and its
baselines trained, registered on the server, artifacts downloaded back over HTTP."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import urllib.request
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from psqa_pipelines_tests.conftest import PSQA_TINY_TRAINING

pytestmark = pytest.mark.skipif(
    shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
    reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed",
)

PLANS = 16
TINY = {**PSQA_TINY_TRAINING, "epochs": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    from psqa_pipelines.cli import init
    from psqa_pipelines.team import TeamServices

    home = tmp_path_factory.mktemp("team-home")
    env = {
        "PSQA_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "PSQA_PROFILE": "team",
        "PSQA_PG_URL": f"postgresql://psqa@127.0.0.1:{_free_port()}",
        "PSQA_MLFLOW_URL": f"http://127.0.0.1:{_free_port()}",
        "MLFLOW_TRACKING_URI": "",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        services = TeamServices(home)
        try:
            state = services.up()
            init(home)
            yield home, env, services, state
        finally:
            services.down()


def _team_defs(home: str):
    """Module level: the worker processes rebuild the same Definitions (settings from the env)."""
    from psqa_pipelines.definitions import build_defs, build_resources
    from psqa_pipelines.resources import PsqaStorage

    return build_defs(build_resources(PsqaStorage(home=home, openkbp_dir="", inbox_settle_seconds=0)))


def _pg_count(url: str, sql: str) -> int:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_psqa_slice_on_postgres_and_the_mlflow_server(team, tmp_path, capfd):
    import mlflow.artifacts
    from dagster._core.storage.dagster_run import DagsterRunStatus

    from ml.psqa.simulator import simulate
    from psqa_pipelines.constants import PSQA_MODEL_NAME
    from psqa_pipelines.defs.psqa.training import training_assets
    from psqa_pipelines.resources import MlflowResource
    from psqa_pipelines.runner import execute_in_location, run_inbox_cycle

    home, env, _services, state = team
    assert state["postgres"]["healthy"] and state["mlflow"]["healthy"]
    assert "postgres:" in (home / "dagster" / "dagster.yaml").read_text()
    simulate(home / "inbox" / "qa", PLANS, seed=3, workers=2)
    factory = functools.partial(_team_defs, str(home))
    defs = factory()
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        report = run_inbox_cycle(defs, instance, raise_on_error=False, workers=2, defs_factory=factory)
        assert len(report.plans) == PLANS and not report.failed
        cfg = {"ops": {a.key.to_user_string(): {"config": TINY} for a in training_assets}}
        res = execute_in_location(defs, "train_psqa", instance, cfg, console_level="WARNING")
        assert res.success
        runs = instance.get_runs()
        assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        run_ids = {r.run_id for r in runs}

    # Dagster's runs and events are in PostgreSQL, and nothing went to SQLite
    pg_dagster = f"{env['PSQA_PG_URL']}/dagster"
    assert _pg_count(pg_dagster, "SELECT count(*) FROM runs") == len(run_ids) == len(report.run_ids) + 1
    assert _pg_count(pg_dagster, "SELECT count(DISTINCT run_id) FROM event_logs") == len(run_ids)
    assert not list((home / "dagster").rglob("*.db"))
    # MLflow's runs and registry are in PostgreSQL behind the server; the client spoke HTTP only
    res = MlflowResource()
    assert res.tracking_uri == env["PSQA_MLFLOW_URL"]
    assert _pg_count(f"{env['PSQA_PG_URL']}/mlflow", "SELECT count(*) FROM runs") >= 7
    assert not (home / "mlflow" / "mlflow.db").exists()
    url = f"{env['PSQA_MLFLOW_URL']}/api/2.0/mlflow/registered-models/get?name={PSQA_MODEL_NAME}"
    with urllib.request.urlopen(url, timeout=30) as r:
        model = json.load(r)["registered_model"]
    version = model["latest_versions"][-1]
    run = res.client().get_run(version["run_id"])
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied by the server
    # the artifacts come back through the server (the client has no path to the artifact folder)
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(tmp_path / "dl"), tracking_uri=res.tracking_uri
        )
    )
    assert {"metrics.json", "history.csv"} <= {p.name for p in local.rglob("*") if p.is_file()}
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{PSQA_MODEL_NAME}/{version['version']}",
            dst_path=str(tmp_path / "model"),
            tracking_uri=res.tracking_uri,
        )
    )
    assert (model_dir / "MLmodel").exists() and any(model_dir.rglob("state_dict.pt"))
    stored = home / "mlflow" / "artifacts"
    assert any(stored.rglob("state_dict.pt"))  # where the server keeps them
    assert "View run" not in capfd.readouterr().out  # MLflow's per-run URL prints are off
    # the lake is the same as in the local profile
    assert len(pd.read_parquet(home / "lake" / "tables" / "psqa_features.parquet")) == PLANS


def test_team_status_and_clear_errors(team, monkeypatch):
    from psqa_pipelines.cli import main
    from psqa_pipelines.settings import team_pg_url

    home = team[0]
    assert main(["--home", str(home), "team", "status"]) == 0
    monkeypatch.setenv("PSQA_PG_URL", "postgresql://psqa:secret@127.0.0.1:5433")
    with pytest.raises(ValueError, match="password"):
        team_pg_url()
    monkeypatch.setenv("PSQA_PROFILE", "teams")
    from psqa_pipelines.settings import profile

    with pytest.raises(ValueError, match="PSQA_PROFILE"):
        profile()
