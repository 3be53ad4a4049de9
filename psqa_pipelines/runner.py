"""Drive the pipeline in-process, exactly as the daemon would (used by the demo and tests).

``run_inbox_cycle`` evaluates ``inbox_sensor`` once, adds the partitions it asks for and
executes the runs it requests in this process (``execute_in_process`` against the given
instance), tagged like sensor-launched runs (``dagster/sensor_name``, ``dagster/run_key``) so a
daemon started later recognises them and does not launch them again. Then it rebuilds the
lake-wide tables and the PSQA tables (what the automation sensor would do).
"""

from dataclasses import dataclass, field

import dagster as dg

from psqa_pipelines.defs.ingest.sensors import inbox_sensor


@dataclass
class CycleReport:
    cursor: str | None
    studies: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    triage_runs: int = 0
    qa_results_runs: int = 0
    files_seen: int = 0
    files_ingested: int = 0
    files_quarantined: int = 0
    results: list = field(default_factory=list)


#: run config that keeps in-process runs readable in a terminal: the console logger at INFO shows the
#: assets' own progress lines (training epochs, summaries) and hides Dagster's per-step DEBUG events
#: (thousands per demo); everything still goes to the instance's event log (the UI shows it all).
CONSOLE_INFO = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def with_console_info(run_config: dict | None = None) -> dict:
    return {**(run_config or {}), **CONSOLE_INFO}


def run_inbox_cycle(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    cursor: str | None = None,
    rebuild_tables: bool = True,
    raise_on_error: bool = False,
) -> CycleReport:
    resources = defs.resources
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"storage": resources["storage"], "deid": resources["deid"]}
    )
    result = inbox_sensor(ctx)
    report = CycleReport(cursor=result.cursor)
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    for req in result.run_requests or []:
        job = defs.resolve_job_def(req.job_name)
        tags = {**req.tags, "dagster/sensor_name": "inbox_sensor", "dagster/run_key": req.run_key}
        run = job.execute_in_process(
            run_config=with_console_info(),
            instance=instance,
            partition_key=req.partition_key,
            tags=tags,
            raise_on_error=raise_on_error,
        )
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
    if rebuild_tables:
        for name in ("lake_tables_job", "psqa_tables_job"):
            report.results.append(
                defs.resolve_job_def(name).execute_in_process(
                    run_config=with_console_info(), instance=instance, raise_on_error=raise_on_error
                )
            )
    return report
