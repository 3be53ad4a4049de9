"""inbox_sensor: partitions, run keys and cursor across ticks."""

from __future__ import annotations

import json
import os
import shutil
import time

import dagster as dg
import pydicom

from psqa_pipelines.defs.ingest.sensors import inbox_sensor
from psqa_pipelines.resources import DeidentificationResource, PsqaStorage
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines_tests.conftest import copy_into


def _tick(instance, storage, cursor=None):
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"storage": storage, "deid": DeidentificationResource()}
    )
    return inbox_sensor(ctx)


def test_first_tick_adds_partitions_and_requests_one_run_per_study(instance, storage, sample_cohort):
    root, truths = sample_cohort
    copy_into(root, storage.inbox)
    result = _tick(instance, storage)
    keys = sorted(result.dynamic_partitions_requests[0].partition_keys)
    assert len(keys) == 2 and all(k.startswith("dcm-") and len(k) == 20 for k in keys)
    assert sorted(r.partition_key for r in result.run_requests) == keys
    assert all(r.run_key.startswith(f"{r.partition_key}:") for r in result.run_requests)
    assert all(r.job_name == "ingest_study_job" for r in result.run_requests)
    cursor = json.loads(result.cursor)
    assert set(cursor["studies"]) == set(keys)
    # nothing identifying in keys, run keys or cursor
    blob = result.cursor + " ".join(r.run_key for r in result.run_requests)
    for t in truths:
        assert t.study_instance_uid not in blob
        assert t.phi.patient_id not in blob


def test_retick_is_idempotent_and_changes_trigger_only_that_study(instance, storage, sample_cohort):
    root, truths = sample_cohort
    copy_into(root, storage.inbox)
    first = _tick(instance, storage)
    instance.add_dynamic_partitions("studies", list(first.dynamic_partitions_requests[0].partition_keys))
    second = _tick(instance, storage, first.cursor)
    assert not second.run_requests and second.skip_reason
    assert not second.dynamic_partitions_requests

    # a study gains a file (a second RTDOSE arrives): only that study is requested again
    src = truths[0].rtdose_file
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["extra-dose"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    rel = src.relative_to(root)
    ds.save_as(storage.inbox / rel.parent / "RD.extra.dcm", enforce_file_format=True)
    third = _tick(instance, storage, second.cursor)
    assert len(third.run_requests) == 1
    changed = third.run_requests[0]
    old = {r.partition_key: r.run_key for r in first.run_requests}
    assert changed.run_key != old[changed.partition_key]
    assert not third.dynamic_partitions_requests


def test_unattributable_files_get_a_triage_run(instance, storage):
    storage.inbox.mkdir(parents=True)
    (storage.inbox / "notes.txt").write_text("not an image")
    (storage.inbox / "junk.dcm").write_bytes(os.urandom(600))
    result = _tick(instance, storage)
    assert [r.job_name for r in result.run_requests] == ["inbox_triage_job"]
    again = _tick(instance, storage, result.cursor)
    assert not again.run_requests


def test_settling_files_are_not_picked_up(instance, tmp_path, sample_cohort):
    root, _ = sample_cohort
    storage = PsqaStorage(home=str(tmp_path / "h"), openkbp_dir="", inbox_settle_seconds=3600)
    copy_into(root, storage.inbox)
    result = _tick(instance, storage)
    assert not result.run_requests
    old = time.time() - 7200
    for p in storage.inbox.rglob("*"):
        os.utime(p, (old, old))
    assert len(_tick(instance, storage, result.cursor).run_requests) == 2


def test_quarantine_moves_do_not_retrigger(instance, storage, make_defs, sample_cohort):
    """A study whose ingestion quarantined a file changed its own fingerprint; the receipt
    stops the sensor from asking for a second run."""
    root, truths = sample_cohort
    copy_into(root, storage.inbox)
    # an exact duplicate of one CT slice, in another folder of the same study
    t = truths[0]
    dup_dir = storage.inbox / "resend"
    dup_dir.mkdir()
    shutil.copyfile(t.ct_files[3], dup_dir / "again.dcm")
    defs = make_defs(storage)
    report = run_inbox_cycle(defs, instance)
    assert report.files_quarantined == 1 and not report.failed
    assert not (dup_dir / "again.dcm").exists()  # moved to quarantine
    again = _tick(instance, storage, report.cursor)
    assert not again.run_requests, [r.partition_key for r in again.run_requests]


def test_in_process_runs_log_info_not_debug_events(tmp_path, capsys):
    """The demo's in-process runs print the assets' progress lines, not Dagster's DEBUG event flood."""
    import dagster as dg

    from psqa_pipelines.runner import with_console_info

    @dg.asset
    def chatty(context) -> int:
        context.log.info("progress line")
        return 1

    res = dg.materialize([chatty], run_config=with_console_info())
    assert res.success
    err = capsys.readouterr().err
    assert "progress line" in err
    assert "STEP_START" not in err and " - DEBUG - " not in err


def test_dev_secret_warning_once_per_process(monkeypatch):
    """66 studies in a demo: the console warns once; every later run still records it at DEBUG."""
    from psqa_pipelines.resources import deid as deid_module

    monkeypatch.setattr(deid_module, "_WARNED", [])
    calls = []

    class Log:
        def warning(self, msg):
            calls.append(("warning", msg))

        def debug(self, msg):
            calls.append(("debug", msg))

    res = deid_module.DeidentificationResource(secret="")
    for _ in range(3):
        res.warn_if_dev(Log())
    assert [level for level, _ in calls] == ["warning", "debug", "debug"]
    assert all("PSQA_DEID_SECRET" in msg for _, msg in calls)
    calls.clear()
    deid_module.DeidentificationResource(secret="a-real-secret").warn_if_dev(Log())
    assert calls == []


def test_plan_study_gets_a_plans_partition_and_its_plan_qa_runs_after_ingestion(instance, storage, make_defs):
    """The daemon path: the sensor adds the plan study to `plans`; the plan-QA assets' eager condition
    requests that partition once the study's ingestion run has written its tables, not before."""
    from ml.psqa.simulator import simulate

    simulate(storage.inbox / "qa", 1, seed=5, workers=1)
    defs = make_defs(storage)
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage, "deid": defs.resources["deid"]})
    result = inbox_sensor(ctx)
    adds = {r.partitions_def_name: list(r.partition_keys) for r in result.dynamic_partitions_requests}
    (key,) = adds["studies"]
    assert adds["plans"] == [key]
    for name, keys in adds.items():
        instance.add_dynamic_partitions(name, keys)
    plan_qa = dg.AssetKey("plan_complexity")
    before = dg.evaluate_automation_conditions(defs, instance, asset_selection=dg.AssetSelection.keys(plan_qa))
    assert before.get_num_requested(plan_qa) == 0  # its study tables do not exist yet
    req = next(r for r in result.run_requests if r.job_name == "ingest_study_job")
    assert defs.resolve_job_def("ingest_study_job").execute_in_process(instance=instance, partition_key=key).success
    after = dg.evaluate_automation_conditions(
        defs, instance, asset_selection=dg.AssetSelection.keys(plan_qa), cursor=before.cursor
    )
    assert after.get_requested_partitions(plan_qa) == {req.partition_key}
    # a plan study ingested before the plans partitions existed gets one on the next tick, no new run
    instance.delete_dynamic_partition("plans", key)
    again = inbox_sensor(
        dg.build_sensor_context(
            instance=instance,
            cursor=result.cursor,
            resources={"storage": storage, "deid": defs.resources["deid"]},
        )
    )
    assert [(r.partitions_def_name, list(r.partition_keys)) for r in again.dynamic_partitions_requests] == [
        ("plans", [key])
    ]
    assert not again.run_requests
