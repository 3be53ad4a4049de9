"""Command lines a user runs: python -m ml, psqa init, dagster/dg validation of the location."""

import json
import os
import subprocess
import sys

import dagster as dg
import pydicom

from psqa_pipelines_tests.conftest import REPO


def _run(args, env=None, timeout=300):
    out = subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_ml_sample_data_cli(tmp_path):
    out = _run(
        [
            sys.executable,
            "-m",
            "ml",
            "sample-data",
            "--out",
            str(tmp_path),
            "--studies",
            "1",
            "--matrix",
            "48",
            "--pixel-spacing",
            "8",
            "--slices",
            "24",
            "--slice-thickness",
            "8",
        ]
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["studies"] == 1 and summary["files"] == 26
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 26
    assert {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files} == {"CT", "RTSTRUCT", "RTDOSE"}


def test_psqa_init_creates_layout_and_a_valid_instance(tmp_path):
    home = tmp_path / "home"
    _run(
        [sys.executable, "-m", "psqa_pipelines.cli", "--home", str(home), "init"],
        env={"DAGSTER_HOME": str(home / "dagster")},
    )
    for sub in ("lake/tables", "inbox", "quarantine", "mlflow/mlflow.db", "dagster/dagster.yaml"):
        assert (home / sub).exists(), sub
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def test_dagster_and_dg_validate_the_code_location(tmp_path):
    env = {"PSQA_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path), "PSQA_OPENKBP_DIR": ""}
    _run([sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"], env=env)
    dg_bin = os.path.join(os.path.dirname(sys.executable), "dg")
    _run([dg_bin, "check", "defs"], env=env)


def test_dev_says_what_runs_by_default(tmp_path):
    """`make dev` prints what starts on its own; the OpenKBP source only when opted in."""
    from psqa_pipelines.cli import _dev_activity
    from psqa_pipelines.resources import PsqaStorage

    off = _dev_activity(PsqaStorage(home=str(tmp_path), openkbp_dir=""))
    assert "inbox_sensor" in off and "OpenKBP source is off" in off and "schedules are stopped" in off
    on = _dev_activity(PsqaStorage(home=str(tmp_path), openkbp_dir=str(tmp_path / "kbp")))
    assert "one ingestion run per new patient" in on


def test_demo_ingests_in_two_worker_processes_and_says_where_the_time_went(tmp_path):
    """`psqa demo` as a user runs it (the training stages off: they have their own tests): the
    ingestion runs execute in 2 spawned processes, which rebuild the demo's Definitions, and every
    run lands in the persistent instance as a run of the code location."""
    home = tmp_path / "home"
    out = _run(
        [sys.executable, "-m", "psqa_pipelines.cli", "--home", str(home), "demo", "--studies", "2"]
        + ["--qa-plans", "0", "--no-contour-dose", "--no-glioma", "--no-shared", "--workers", "2"],
        env={"DAGSTER_HOME": "", "PSQA_HOME": ""},
    )
    assert "ingested 2 studies" in out and "(2 worker processes)" in out
    assert "demo finished in" in out and "2 studies ingested, 0 failed" in out
    assert "where the time went: setup" in out and "ingestion" in out
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        runs = instance.get_runs()
        in_location = instance.get_runs(RunsFilter(tags={REPOSITORY_LABEL_TAG: "__repository__@psqa_pipelines"}))
    assert sorted(r.job_name for r in runs) == ["ingest_study_job"] * 2 + ["lake_tables_job", "psqa_tables_job"]
    # every run succeeded, also the PSQA tables with no plan study yet (empty tables, not a failure)
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs), [(r.job_name, r.status) for r in runs]
    assert {r.run_id for r in in_location} == {r.run_id for r in runs}
