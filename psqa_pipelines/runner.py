"""Drive the pipeline in-process, exactly as the daemon would (used by the demo and tests).

``run_inbox_cycle`` evaluates ``inbox_sensor`` once, adds the partitions it asks for and
executes the runs it requests in this process (``execute_in_location``: ``execute_in_process``
against the given instance, as runs of workspace.yaml's code location, so the UI lists them on the
job pages), tagged like sensor-launched runs (``dagster/sensor_name``, ``dagster/run_key``) so a
daemon started later recognises them and does not launch them again. Then it does what the
automation sensor would do: ``plan_qa_job`` for every plan study just ingested, and the lake-wide
and PSQA tables.
"""

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg

from psqa_pipelines.constants import PLANS_PARTITION
from psqa_pipelines.defs.ingest.sensors import inbox_sensor
from psqa_pipelines.settings import REPO_DIR

#: the code location and repository of workspace.yaml (``dg.Definitions`` load as ``__repository__``)
LOCATION_NAME = "psqa_pipelines"
REPOSITORY_NAME = "__repository__"
DEFINITIONS_MODULE = "psqa_pipelines.definitions"


@dataclass
class CycleReport:
    cursor: str | None
    studies: list[str] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)  # plan studies whose plan-QA run succeeded
    failed: list[str] = field(default_factory=list)
    triage_runs: int = 0
    qa_results_runs: int = 0
    files_seen: int = 0
    files_ingested: int = 0
    files_quarantined: int = 0
    results: list = field(default_factory=list)


def with_console_info(run_config: dict | None = None, level: str = "INFO") -> dict:
    """``run_config`` with the console logger at ``level``. INFO keeps in-process runs readable in a
    terminal: the assets' own progress lines (training epochs, summaries) without Dagster's per-step
    DEBUG events (thousands per demo); WARNING under a progress bar; DEBUG = the full event stream
    (the demo's ``--verbose``). Everything always goes to the instance's event log (the UI shows it)."""
    return {**(run_config or {}), "loggers": {"console": {"config": {"log_level": level}}}}


def location_job_origin(job_name: str):
    """The origin of ``job_name`` in workspace.yaml's code location, as ``dagster dev`` loads it
    (a Python module in a managed gRPC server, ``__repository__``)."""
    from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin, RemoteRepositoryOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    target = LoadableTargetOrigin(
        executable_path=sys.executable, module_name=DEFINITIONS_MODULE, working_directory=str(REPO_DIR)
    )
    location = ManagedGrpcPythonEnvCodeLocationOrigin(loadable_target_origin=target, location_name=LOCATION_NAME)
    return RemoteRepositoryOrigin(code_location_origin=location, repository_name=REPOSITORY_NAME).get_job_origin(
        job_name
    )


@contextmanager
def _runs_in_location(instance: dg.DagsterInstance, job_name: str):
    """Runs created on ``instance`` inside the block carry the code location's job origin.

    ``execute_in_process`` has no origin argument, so its runs belong to no code location: the UI's
    job pages and the Overview timeline (which select runs by the repository label the origin
    gives) would not show them. This wraps the instance's ``create_run_for_job`` for the block."""
    origin = location_job_origin(job_name)
    create = instance.create_run_for_job

    def create_in_location(*args, **kwargs):
        kwargs.setdefault("remote_job_origin", origin)
        return create(*args, **kwargs)

    instance.create_run_for_job = create_in_location
    try:
        yield
    finally:
        del instance.create_run_for_job


def execute_in_location(
    defs: dg.Definitions,
    job_name: str,
    instance: dg.DagsterInstance,
    run_config: dict | None = None,
    console_level: str = "INFO",
    **kwargs,
) -> dg.ExecuteInProcessResult:
    """Execute a job of ``defs`` in this process as a run of the workspace's code location: same
    code, same instance as a UI-launched run, listed on the job's page and in the Overview
    timeline, re-executable from the UI. The console shows the assets' lines from ``console_level``
    up (INFO: their progress lines, not Dagster's DEBUG events); ``kwargs`` go to ``execute_in_process``."""
    job = defs.resolve_job_def(job_name)
    with _runs_in_location(instance, job_name):
        return job.execute_in_process(
            run_config=with_console_info(run_config, console_level), instance=instance, **kwargs
        )


def run_inbox_cycle(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    cursor: str | None = None,
    rebuild_tables: bool = True,
    raise_on_error: bool = False,
    progress: bool = False,
    console_level: str = "INFO",
) -> CycleReport:
    """One sensor tick and its runs (module docstring). ``progress``: a progress bar over the
    requested runs (tqdm on stderr; the runs' console output drops to WARNING under it, their full
    event logs are in the instance) and a summary line."""
    import time

    from tqdm import tqdm

    resources = defs.resources
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"storage": resources["storage"], "deid": resources["deid"]}
    )
    result = inbox_sensor(ctx)
    report = CycleReport(cursor=result.cursor)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    requests = list(result.run_requests or [])
    t0 = time.perf_counter()
    level = "WARNING" if progress and console_level == "INFO" else console_level
    bar = tqdm(total=len(requests), desc="ingestion runs", unit="run", disable=not progress or not requests)
    for req in requests:
        tags = {**req.tags, "dagster/sensor_name": "inbox_sensor", "dagster/run_key": req.run_key}
        run = execute_in_location(
            defs,
            req.job_name,
            instance,
            console_level=level,
            partition_key=req.partition_key,
            tags=tags,
            raise_on_error=raise_on_error,
        )
        bar.update(1)
        report.results.append(run)
        if req.partition_key:
            (report.studies if run.success else report.failed).append(req.partition_key)
        elif req.job_name == "qa_results_job":
            report.qa_results_runs += 1
        else:
            report.triage_runs += 1
        for mat in run.get_asset_materialization_events():
            md = mat.materialization.metadata
            if mat.asset_key.to_user_string() in ("study_files", "inbox_triage"):
                report.files_seen += int(md["files_seen"].value)
                report.files_ingested += int(md["files_ingested"].value)
                report.files_quarantined += int(md["files_quarantined"].value)
    bar.close()
    # what the automation sensor does next: the plan-QA assets of every plan study just ingested
    plans = set(instance.get_dynamic_partitions(PLANS_PARTITION))
    plan_keys = [k for k in report.studies if k in plans]
    for key in tqdm(plan_keys, desc="plan-QA runs", unit="run", disable=not progress or not plan_keys):
        run = execute_in_location(
            defs,
            "plan_qa_job",
            instance,
            console_level=level,
            partition_key=key,
            raise_on_error=raise_on_error,
        )
        report.results.append(run)
        (report.plans if run.success else report.failed).append(key)
    if progress and requests:
        print(
            f"ingested {len(report.studies)} studies ({len(report.plans)} with RT Plans; {len(report.failed)} failed, "
            f"{report.triage_runs} triage and "
            f"{report.qa_results_runs} QA-results runs): {report.files_ingested} files in, "
            f"{report.files_quarantined} quarantined, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    if rebuild_tables:
        for name in ("lake_tables_job", "psqa_tables_job"):
            report.results.append(
                execute_in_location(defs, name, instance, console_level=level, raise_on_error=raise_on_error)
            )
    return report
