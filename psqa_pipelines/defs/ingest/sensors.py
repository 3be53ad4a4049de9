"""The inbox sensor: landing folders -> study partitions and ingestion runs.

Each tick scans the inbox and the OpenKBP folder (header reads are cached), groups files into
studies and, for every study whose file fingerprint (paths, sizes, mtimes) is new or changed:

* adds the study's pseudonymous key as a dynamic partition (``SensorResult`` request), and to the
  ``plans`` partitions too when the study has an RT Plan file (its plan-QA assets then run after
  the ingestion, by their eager automation condition),
* requests one ``ingest_study_job`` run with ``run_key = "<study>:<fingerprint>"``: a re-tick
  never launches a second run for the same content, a changed study gets a new run.

Unattributable files get one ``inbox_triage_job`` run per distinct set; QA-system result exports
(CSV, ``ml.data.inbox.is_qa_results_csv``) one ``qa_results_job`` run per distinct set. The cursor
is JSON ``{"studies": {key: fingerprint}, "triage": fingerprint, "qa_results": fingerprint}``; an
ingestion that quarantined files (and so changed the study's fingerprint itself) leaves a receipt
that the sensor honours, so our own moves do not trigger a second run. Only counts are logged.
"""

import json

import dagster as dg

from ml.data.inbox import fingerprint, read_receipt, scan_sources
from psqa_pipelines.constants import STUDY_FILES_TAG
from psqa_pipelines.defs.ingest import jobs
from psqa_pipelines.lib.partitions import plans_partitions, studies_partitions
from psqa_pipelines.resources import DeidentificationResource, PsqaStorage


def _load_cursor(raw: str | None) -> dict:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    return {
        "studies": dict(data.get("studies", {})),
        "triage": str(data.get("triage", "")),
        "qa_results": str(data.get("qa_results", "")),
    }


@dg.sensor(
    name="inbox_sensor",
    jobs=[jobs.ingest_study_job, jobs.inbox_triage_job, jobs.qa_results_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches $PSQA_HOME/inbox and the OpenKBP folder; one partition and one run per new or changed study.",
)
def inbox_sensor(context: dg.SensorEvaluationContext, storage: PsqaStorage, deid: DeidentificationResource):
    storage.ensure_dirs()
    cursor = _load_cursor(context.cursor)
    scan = scan_sources(storage.sources(), deid.pseudonymizer(), settle_seconds=storage.inbox_settle_seconds)
    existing = set(context.instance.get_dynamic_partitions(studies_partitions.name))
    existing_plans = set(context.instance.get_dynamic_partitions(plans_partitions.name))
    new_keys: list[str] = []
    new_plan_keys: list[str] = []
    requests: list[dg.RunRequest] = []
    for key, (_, group) in sorted(scan.studies.items()):
        fp = group.fingerprint
        if key not in existing_plans and any(f.modality == "RTPLAN" for f in group.files):
            # its plans partition (also for a study ingested before plans partitions existed); the
            # plan-QA assets follow its ingestion through their eager automation condition
            new_plan_keys.append(key)
        if cursor["studies"].get(key) == fp:
            continue
        receipt = read_receipt(storage.state, key)
        cursor["studies"][key] = fp
        if receipt and receipt.get("fingerprint_after") == fp and key in existing:
            continue  # only our own quarantine moves changed it
        if key not in existing:
            new_keys.append(key)
        requests.append(
            dg.RunRequest(
                job_name=jobs.ingest_study_job.name,
                partition_key=key,
                run_key=f"{key}:{fp}",
                tags={"psqa/source": group.source, STUDY_FILES_TAG: str(len(group.files))},
            )
        )
    # one run per distinct set of loose files: unattributable files -> triage, QA exports -> qa_results
    for cursor_key, job, attr in (
        ("triage", jobs.inbox_triage_job, "unattributed"),
        ("qa_results", jobs.qa_results_job, "qa_tables"),
    ):
        files = [ref for s in scan.scans.values() for ref in getattr(s, attr)]
        if files and (fp := fingerprint(files)) != cursor[cursor_key]:
            requests.append(dg.RunRequest(job_name=job.name, run_key=f"{cursor_key}:{fp}"))
            cursor[cursor_key] = fp
    summary = scan.summary()
    context.log.info(
        f"scan: {json.dumps(summary, sort_keys=True)}; new partitions: {len(new_keys)} studies, "
        f"{len(new_plan_keys)} plans; runs requested: {len(requests)}"
    )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[
            *([studies_partitions.build_add_request(new_keys)] if new_keys else []),
            *([plans_partitions.build_add_request(new_plan_keys)] if new_plan_keys else []),
        ],
        cursor=json.dumps(cursor, sort_keys=True),
        skip_reason=None if requests else "no new or changed studies",
    )
