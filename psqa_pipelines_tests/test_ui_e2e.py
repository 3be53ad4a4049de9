"""End to end through the real UI: dagster-webserver on a free loopback port with a temporary
PSQA_HOME, headless Debian Chromium driven by Playwright.

Checks that the code location loads in the server, the asset groups render in the lineage
view, and that a materialization launched with the UI's Materialize button succeeds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from psqa_pipelines_tests.conftest import REPO, SMALL_STUDY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright (chromium UI test)")
pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian chromium (apt-get install chromium)"),
]
CHROME_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, log) -> None:
    """Stop a server started in its own session (its whole process group), then close its log."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _gql(base: str, query: str) -> dict:
    req = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture
def webserver(tmp_path):
    from ml.data.synthetic import generate_hn_cohort

    home = tmp_path / "home"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    # the shipped instance config queues runs for the daemon (dagster dev); a bare webserver
    # has no daemon, so this instance launches runs directly
    (dagster_home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
    )
    generate_hn_cohort(home / "inbox" / "hn", 1, seed=3, **SMALL_STUDY)
    port = _free_port()
    env = dict(
        os.environ, PSQA_HOME=str(home), DAGSTER_HOME=str(dagster_home), PSQA_OPENKBP_DIR="", PYTHONUNBUFFERED="1"
    )
    log = open(tmp_path / "webserver.log", "w")  # noqa: SIM115 (handed to the server process, closed at teardown)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_webserver",
            "-w",
            str(REPO / "workspace.yaml"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/server_info", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp_path / "webserver.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        else:
            raise TimeoutError("dagster-webserver did not answer in 120 s")
        yield base, home
    finally:
        _stop(proc, log)


def test_groups_render_and_a_ui_launched_materialization_succeeds(webserver):
    base, home = webserver
    entries = _gql(
        base,
        "{ workspaceOrError { ... on Workspace { locationEntries { name "
        "locationOrLoadError { __typename ... on PythonError { message } } } } } }",
    )
    loc = entries["data"]["workspaceOrError"]["locationEntries"][0]
    assert loc["locationOrLoadError"]["__typename"] == "RepositoryLocation", loc

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(f"{base}/asset-groups", wait_until="domcontentloaded")
            for group in ("ingest", "preprocess", "lake_tables"):
                page.get_by_text(group, exact=True).first.wait_for(timeout=60000)

            page.goto(f"{base}/assets/inbox_triage", wait_until="domcontentloaded")
            button = page.get_by_role("button", name="Materialize").first
            button.wait_for(timeout=60000)
            try:  # first-visit newsletter dialog, when it shows
                page.get_by_role("button", name="Skip").click(timeout=3000)
            except playwright.Error:
                pass
            button.click()

            status, run_id = None, None
            deadline = time.time() + 180
            while time.time() < deadline:
                runs = _gql(base, "{ runsOrError { ... on Runs { results { runId status } } } }")
                results = runs["data"]["runsOrError"]["results"]
                if results:
                    run_id, status = results[0]["runId"], results[0]["status"]
                    if status in ("SUCCESS", "FAILURE", "CANCELED"):
                        break
                time.sleep(1)
            assert status == "SUCCESS", status
            page.goto(f"{base}/runs/{run_id}", wait_until="domcontentloaded")
            page.get_by_text("Success").first.wait_for(timeout=60000)
            page.get_by_text("RUN_SUCCESS").first.wait_for(timeout=60000)
        finally:
            browser.close()
    # the run really executed the asset in the temporary PSQA_HOME
    assert (home / "lake" / "tables" / "inbox_triage.parquet").exists()


def _mlflow_server(tmp_path: Path, db: Path, artifacts: Path):
    port = _free_port()
    log = open(tmp_path / "mlflow.log", "w")  # noqa: SIM115 (closed by the caller's teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
        + ["--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return proc, log, base
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((tmp_path / "mlflow.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not answer in 120 s")


def test_demo_runs_on_job_pages_column_docs_and_the_mlflow_link_back(webserver, tmp_path):
    """What a user opens after `make demo`: the in-process runs on their job's page (they belong to
    the code location), the Columns table with descriptions, and the MLflow run's link back to Dagster."""
    import dagster as dg

    from psqa_pipelines.definitions import build_defs, build_resources
    from psqa_pipelines.resources import MlflowResource, PsqaStorage
    from psqa_pipelines.runner import run_inbox_cycle

    base, home = webserver
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    storage = PsqaStorage(home=str(home), openkbp_dir="", inbox_settle_seconds=0)
    mlflow = MlflowResource(
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}", artifact_root=str(home / "artifacts"), experiment="e2e"
    )
    report = run_inbox_cycle(build_defs(build_resources(storage, mlflow=mlflow)), instance)
    assert len(report.studies) == 1 and not report.failed
    study_run = report.results[0].run_id

    @dg.asset(required_resource_keys={"mlflow"})
    def tracked(context) -> None:
        res = context.resources.mlflow
        res.end_run(res.start_run(context, run_name="e2e"))

    tracked_run = dg.materialize([tracked], resources={"mlflow": mlflow}, instance=instance).run_id
    ml_run = mlflow.client().search_runs([mlflow.experiment_id()])[0]
    assert f"/runs/{tracked_run}" in ml_run.data.tags["mlflow.note.content"]

    job = _gql(
        base,
        '{ pipelineOrError(params: {pipelineName: "ingest_study_job", repositoryName: "__repository__", '
        'repositoryLocationName: "psqa_pipelines"}) { ... on Pipeline { runs { runId } } } }',
    )
    assert study_run in [r["runId"] for r in job["data"]["pipelineOrError"]["runs"]]

    server, log, ml_base = _mlflow_server(tmp_path, home / "mlflow.db", home / "artifacts")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 950})
                page.goto(f"{base}/locations/psqa_pipelines/jobs/ingest_study_job/runs", wait_until="domcontentloaded")
                page.get_by_text(study_run[:8]).first.wait_for(timeout=60000)
                page.goto(f"{base}/assets/study_files", wait_until="domcontentloaded")
                page.get_by_text("pseudonymous study id").first.wait_for(timeout=60000)
                page.goto(
                    f"{ml_base}/#/experiments/{ml_run.info.experiment_id}/runs/{ml_run.info.run_id}",
                    wait_until="domcontentloaded",
                )
                link = page.locator(f'a[href$="/runs/{tracked_run}"]').first
                link.wait_for(timeout=60000)
            finally:
                browser.close()
    finally:
        _stop(server, log)
