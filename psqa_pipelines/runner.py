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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg

from psqa_pipelines.constants import PLANS_PARTITION, STUDY_FILES_TAG
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
    results: list = field(default_factory=list)  # ExecuteInProcessResult of the runs this process executed
    run_ids: list[str] = field(default_factory=list)  # every run of the cycle, also those of worker processes


@dataclass
class _RunOutcome:
    """What the cycle needs from a run, picklable (a worker process returns it)."""

    job_name: str
    partition_key: str | None
    run_id: str
    success: bool
    files: tuple[int, int, int] = (0, 0, 0)  # seen, ingested, quarantined

    @classmethod
    def of(cls, job_name: str, partition_key: str | None, run: dg.ExecuteInProcessResult) -> "_RunOutcome":
        seen = ingested = quarantined = 0
        for mat in run.get_asset_materialization_events():
            md = mat.materialization.metadata
            if mat.asset_key.to_user_string() in ("study_files", "inbox_triage"):
                seen += int(md["files_seen"].value)
                ingested += int(md["files_ingested"].value)
                quarantined += int(md["files_quarantined"].value)
        return cls(job_name, partition_key, run.run_id, run.success, (seen, ingested, quarantined))


# worker-process state of a parallel cycle (one Definitions and one instance per process)
_WORKER: dict = {}


def _worker_init(defs_factory: Callable[[], dg.Definitions], instance_ref) -> None:
    from psqa_pipelines.resources.deid import dev_secret_warning_shown

    dev_secret_warning_shown()  # the parent showed it once; the runs' event logs keep it at DEBUG
    _WORKER["defs"] = defs_factory()
    _WORKER["instance"] = dg.DagsterInstance.from_ref(instance_ref)  # the parent's storage


def _worker_ready() -> None:
    """A no-op task: submitting one per worker starts the processes (and their imports) early."""


def _execute_call(defs, instance, call: tuple, level: str, raise_on_error: bool) -> dg.ExecuteInProcessResult:
    """One requested run, ``call`` = (job name, partition key or None, tags or None)."""
    job_name, key, tags = call
    return execute_in_location(
        defs, job_name, instance, console_level=level, partition_key=key, tags=tags, raise_on_error=raise_on_error
    )


def _worker_run(call: tuple, level: str, raise_on_error: bool) -> _RunOutcome:
    run = _execute_call(_WORKER["defs"], _WORKER["instance"], call, level, raise_on_error)
    return _RunOutcome.of(call[0], call[1], run)


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
    workers: int = 1,
    defs_factory: Callable[[], dg.Definitions] | None = None,
) -> CycleReport:
    """One sensor tick and its runs (module docstring). ``progress``: a progress bar over the
    requested runs (tqdm on stderr; the runs' console output drops to WARNING under it, their full
    event logs are in the instance) and a summary line.

    ``workers`` > 1 (with ``defs_factory``, a picklable callable that rebuilds ``defs`` in a fresh
    process): the ingestion runs, then the plan-QA runs, execute in that many spawned processes at
    once (each with its own instance on the same ``DAGSTER_HOME``), as the daemon runs up to
    ``max_concurrent_runs`` at once; ``results`` then holds only the runs of this process."""
    import time

    from tqdm import tqdm

    resources = defs.resources
    level = "WARNING" if progress and console_level == "INFO" else console_level
    # worker processes (if any) start now and import while this process evaluates the sensor
    with _Executor(defs, instance, level, raise_on_error, workers if defs_factory else 1, defs_factory) as ex:
        ctx = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"storage": resources["storage"], "deid": resources["deid"]}
        )
        result = inbox_sensor(ctx)
        report = CycleReport(cursor=result.cursor)
        for req in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        requests = list(result.run_requests or [])
        t0 = time.perf_counter()
        calls = [
            (
                req.job_name,
                req.partition_key,
                {**req.tags, "dagster/sensor_name": "inbox_sensor", "dagster/run_key": req.run_key},
            )
            for req in requests
        ]
        if ex.workers > 1:  # longest first: a big CT study started last would leave one worker idle
            calls.sort(key=lambda c: -int(c[2].get(STUDY_FILES_TAG, 0)))
        for out in ex.map(
            calls, tqdm(total=len(calls), desc="ingestion runs", unit="run", disable=not progress or not calls)
        ):
            report.run_ids.append(out.run_id)
            if out.partition_key:
                (report.studies if out.success else report.failed).append(out.partition_key)
            elif out.job_name == "qa_results_job":
                report.qa_results_runs += 1
            else:
                report.triage_runs += 1
            report.files_seen += out.files[0]
            report.files_ingested += out.files[1]
            report.files_quarantined += out.files[2]
        # what the automation sensor does next: the plan-QA assets of every plan study just ingested
        plans = set(instance.get_dynamic_partitions(PLANS_PARTITION))
        plan_calls = [("plan_qa_job", k, None) for k in report.studies if k in plans]
        bar = tqdm(total=len(plan_calls), desc="plan-QA runs", unit="run", disable=not progress or not plan_calls)
        for out in ex.map(plan_calls, bar):
            report.run_ids.append(out.run_id)
            (report.plans if out.success else report.failed).append(out.partition_key)
    report.results = ex.results
    if progress and requests:
        print(
            f"ingested {len(report.studies)} studies ({len(report.plans)} with RT Plans; {len(report.failed)} failed, "
            f"{report.triage_runs} triage and "
            f"{report.qa_results_runs} QA-results runs): {report.files_ingested} files in, "
            f"{report.files_quarantined} quarantined, {time.perf_counter() - t0:.0f} s"
            + (f" ({ex.workers} worker processes)" if ex.workers > 1 else ""),
            flush=True,
        )
    if rebuild_tables:
        for name in ("lake_tables_job", "psqa_tables_job"):
            run = execute_in_location(defs, name, instance, console_level=level, raise_on_error=raise_on_error)
            report.results.append(run)
            report.run_ids.append(run.run_id)
    return report


class _Executor:
    """Executes runs in this process (``workers`` = 1) or in a pool of spawned worker processes;
    ``map`` yields each run's outcome (in completion order) and advances the progress bar."""

    def __init__(self, defs, instance, level, raise_on_error, workers, defs_factory):
        self.defs, self.instance, self.level, self.raise_on_error = defs, instance, level, raise_on_error
        # an in-memory (ephemeral) instance cannot be shared with other processes
        self.workers = max(1, workers) if not instance.is_ephemeral else 1
        self.defs_factory = defs_factory
        self.results: list = []
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing

            self.defs.resources["deid"].warn_if_dev(dg.get_dagster_logger())  # once, here, not once per worker
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # never fork a process holding torch/sqlite state
                initializer=_worker_init,
                initargs=(self.defs_factory, self.instance.get_ref()),
            )
            for _ in range(self.workers):  # start every worker now (the pool spawns them on demand)
                self.pool.submit(_worker_ready)
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False

    def map(self, calls, bar):
        try:
            if self.pool is None:
                for call in calls:
                    run = _execute_call(self.defs, self.instance, call, self.level, self.raise_on_error)
                    self.results.append(run)
                    bar.update(1)
                    yield _RunOutcome.of(call[0], call[1], run)
            else:
                from concurrent.futures import as_completed

                futures = [self.pool.submit(_worker_run, call, self.level, self.raise_on_error) for call in calls]
                for fut in as_completed(futures):
                    bar.update(1)
                    yield fut.result()
        finally:
            bar.close()
