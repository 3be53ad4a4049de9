"""Study ingestion and preprocessing through Dagster (in-process, temporary instance)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from ml.data.volume import read_nifti
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines_tests.conftest import copy_into


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_study_ingest_and_preprocess(storage, make_defs, instance, sample_cohort, capfd):
    root, truths = sample_cohort
    copy_into(root, storage.inbox)
    defs = make_defs(storage)
    report = run_inbox_cycle(defs, instance, progress=True)
    assert len(report.studies) == 2 and not report.failed
    out, err = capfd.readouterr()
    assert "ingested 2 studies (0 with RT Plans; 0 failed" in out and "68 files in" in out  # one summary line
    assert "ingestion runs" in err and "2/2" in err  # the progress bar
    assert "STEP_START" not in err and "STEP_OUTPUT" not in err  # no Dagster event flood
    # CT studies without an RT Plan get no plan-QA partition: nothing "missing" that cannot exist
    assert instance.get_dynamic_partitions("plans") == [] and report.plans == []
    assert report.files_seen == report.files_ingested == 2 * 34 and report.files_quarantined == 0

    # every asset check of every run passed
    for res in report.results:
        for ev in res.get_asset_check_evaluations():
            assert ev.passed, (ev.asset_key, ev.check_name, ev.metadata)

    # the runs belong to workspace.yaml's code location: the UI's job pages select them by this label
    import yaml
    from dagster._core.storage.dagster_run import RunsFilter
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG

    from psqa_pipelines_tests.conftest import REPO

    location = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    label = f"__repository__@{location['location_name']}"
    for job in ("ingest_study_job", "lake_tables_job", "psqa_tables_job"):
        runs = instance.get_runs(RunsFilter(job_name=job, tags={REPOSITORY_LABEL_TAG: label}))
        assert len(runs) == (2 if job == "ingest_study_job" else 1), job
        origin = runs[0].remote_job_origin
        assert origin.location_name == location["location_name"] and origin.job_name == job
        target = origin.repository_origin.code_location_origin.loadable_target_origin
        assert target.module_name == location["module_name"]

    files = pd.read_parquet(storage.tables / "file_index.parquet")
    assert len(files) == 68
    assert set(files["modality"]) == {"CT", "RTSTRUCT", "RTDOSE"}
    assert files["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert files["source_sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    # per-study partition tables exist where the IO manager puts them
    for key in report.studies:
        assert (storage.tables / "study_files" / f"{key}.parquet").exists()
        assert (storage.tables / "study_volumes" / f"{key}.parquet").exists()

    manifest = pd.read_parquet(storage.tables / "volume_manifest.parquet")
    study_index = pd.read_parquet(storage.tables / "study_index.parquet")
    assert study_index["has_ct"].all() and study_index["has_dose"].all() and study_index["has_structures"].all()
    for truth in truths:
        from ml.data.dicom.deid import Pseudonymizer

        key = Pseudonymizer().study("dcm", truth.study_instance_uid)
        m = manifest[manifest["study_key"] == key]
        ct = read_nifti(storage.lake / m[m["kind"] == "ct"]["path"].iloc[0])
        assert np.array_equal(ct.array, truth.hu)
        assert np.allclose(ct.origin, truth.ct_origin) and np.allclose(ct.spacing, truth.ct_spacing)
        masks = m[m["kind"] == "mask"]
        assert set(masks["name"]) == {
            "Body",
            "PTV70",
            "PTV56",
            "Brainstem",
            "SpinalCord",
            "LeftParotid",
            "RightParotid",
            "Mandible",
        }
        assert masks["grid_id"].nunique() == 1 and masks["grid_id"].iloc[0] == m[m["kind"] == "ct"]["grid_id"].iloc[0]
        ptv = read_nifti(storage.lake / masks[masks["name"] == "PTV70"]["path"].iloc[0]).array.astype(bool)
        assert np.array_equal(ptv, truth.masks["PTV70"])
        dose = read_nifti(storage.lake / m[m["kind"] == "dose"]["path"].iloc[0]).array
        assert dose.shape == truth.hu.shape
        # dose resampled to the CT grid: the PTV70 median is close to the prescription
        assert 66 < float(np.median(dose[ptv])) < 76
        assert abs(float(dose.max()) - float(truth.dose_gy.max())) < 1.0


def test_stored_dicom_copies_are_deidentified_and_linked(storage, make_defs, instance, sample_cohort):
    root, truths = sample_cohort
    copy_into(root, storage.inbox)
    run_inbox_cycle(make_defs(storage), instance)
    files = pd.read_parquet(storage.tables / "file_index.parquet")
    ct_uids = set(files.loc[files["modality"] == "CT", "sop_instance_uid"])
    for rel in files.loc[files["modality"] == "RTSTRUCT", "stored_path"]:
        ds = pydicom.dcmread(storage.lake / rel)
        refs = {
            c.ReferencedSOPInstanceUID
            for roi in ds.ROIContourSequence
            for cs in roi.ContourSequence
            for c in cs.ContourImageSequence
        }
        assert refs and refs <= ct_uids
        assert str(ds.PatientIdentityRemoved) == "YES"
    originals = {t.study_instance_uid for t in truths} | {t.ct_series_uid for t in truths}
    assert not originals & set(files["series_instance_uid"])


def test_rematerialising_unchanged_inputs_gives_identical_outputs(storage, make_defs, instance, sample_cohort):
    root, _ = sample_cohort
    copy_into(root, storage.inbox)
    defs = make_defs(storage)
    report = run_inbox_cycle(defs, instance)
    before = _tree_digest(storage.lake / "studies") | _tree_digest(storage.lake / "volumes")
    tables_before = _tree_digest(storage.tables)
    job = defs.resolve_job_def("ingest_study_job")
    for key in report.studies:
        assert job.execute_in_process(instance=instance, partition_key=key).success
    defs.resolve_job_def("lake_tables_job").execute_in_process(instance=instance)
    after = _tree_digest(storage.lake / "studies") | _tree_digest(storage.lake / "volumes")
    assert before == after
    assert tables_before == _tree_digest(storage.tables)


def test_preview_and_counts_in_metadata(storage, make_defs, instance, sample_cohort):
    root, _ = sample_cohort
    copy_into(root, storage.inbox)
    report = run_inbox_cycle(make_defs(storage), instance, rebuild_tables=False)
    mats = [m for r in report.results for m in r.get_asset_materialization_events()]
    vols = [m.materialization for m in mats if m.asset_key.to_user_string() == "study_volumes"]
    assert vols and all("data:image/png;base64," in v.metadata["preview"].value for v in vols)
    files = [m.materialization for m in mats if m.asset_key.to_user_string() == "study_files"]
    assert all(f.metadata["dagster/row_count"].value == 34 for f in files)
    assert all("dagster/column_schema" in f.metadata for f in files)


def _parallel_test_defs(home: str, mlflow_uri: str, artifacts: str):
    """Module level, so a spawned worker process can rebuild the test's Definitions."""
    from psqa_pipelines.definitions import build_defs, build_resources
    from psqa_pipelines.resources import MlflowResource, PsqaStorage

    storage = PsqaStorage(home=home, openkbp_dir="", inbox_settle_seconds=0)
    mlflow = MlflowResource(tracking_uri=mlflow_uri, artifact_root=artifacts, experiment="psqa-tests")
    return build_defs(build_resources(storage, mlflow=mlflow))


def test_parallel_cycle_runs_every_study_in_worker_processes(
    storage, mlflow_store, instance, sample_cohort, capfd, caplog
):
    """The demo's path: ingestion and plan-QA runs in 2 spawned processes on the same instance; the
    same studies, plans, files and tables as one process, every run of the code location, the
    dev-secret warning once."""
    import functools

    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG

    from ml.psqa.simulator import simulate
    from psqa_pipelines.resources import deid

    root, _ = sample_cohort
    copy_into(root, storage.inbox)
    simulate(storage.inbox / "qa", 2, seed=5, workers=1)
    deid._WARNED.clear()
    factory = functools.partial(
        _parallel_test_defs, storage.home, mlflow_store.tracking_uri, mlflow_store.artifact_root
    )
    report = run_inbox_cycle(factory(), instance, progress=True, workers=2, defs_factory=factory)
    assert len(report.studies) == 4 and len(report.plans) == 2 and not report.failed
    assert report.qa_results_runs == 1 and report.files_ingested == report.files_seen > 2 * 34
    out, err = capfd.readouterr()
    assert "(2 worker processes)" in out
    assert "ingestion runs" in err and "5/5" in err and "plan-QA runs" in err and "2/2" in err  # the bars
    msg = "De-identification uses the development secret"
    # once, in this process (pytest's log capture); never in a worker's console output
    assert [r.levelname for r in caplog.records if msg in r.getMessage()] == ["WARNING"] and msg not in out + err
    # every run (also those of the worker processes) succeeded and belongs to the code location
    runs = instance.get_runs(RunsFilter(tags={REPOSITORY_LABEL_TAG: "__repository__@psqa_pipelines"}))
    assert {r.run_id for r in runs} == set(report.run_ids)
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
    by_job = pd.Series([r.job_name for r in runs]).value_counts().to_dict()
    assert by_job == {
        "ingest_study_job": 4,
        "plan_qa_job": 2,
        "qa_results_job": 1,
        "lake_tables_job": 1,
        "psqa_tables_job": 1,
    }
    # each ingestion run carries its study's file count (the biggest studies start first)
    ingest = [r for r in runs if r.job_name == "ingest_study_job"]
    assert sum(int(r.tags["psqa/files"]) for r in ingest) == report.files_seen
    # the lake-wide tables (built after the workers finished) see every study
    series = pd.read_parquet(storage.tables / "series_index.parquet")
    assert set(series["study_key"]) == set(report.studies)
    plan_tables = {p.stem for p in (storage.tables / "plan_complexity").glob("*.parquet")}
    assert plan_tables == set(report.plans)
