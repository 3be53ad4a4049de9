"""A hostile drop: every file pydicom ships (many odd or broken on purpose) plus our own
malformed files, next to a good study. Nothing crashes, nothing is lost:

    files seen == files ingested + files quarantined      (per run and for the whole drop)

and the good study ingests completely.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ml.data.dicom.deid import Pseudonymizer
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines_tests.conftest import SMALL_STUDY


def _new_uid(tag: str) -> str:
    return pydicom.uid.generate_uid(entropy_srcs=[tag])


def _restudy(ds, tag: str) -> None:
    """Put a copied dataset into a study of its own."""
    ds.StudyInstanceUID = _new_uid(f"study-{tag}")
    ds.SeriesInstanceUID = _new_uid(f"series-{tag}")


def _save(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def hostile_drop(tmp_path_factory, storage):
    from ml.data.synthetic import generate_hn_study

    inbox = storage.inbox
    # 1. every file shipped with pydicom (recursively: DICOMDIR trees, json, icc, gz ...)
    src = Path(get_testdata_file("CT_small.dcm")).parent
    shutil.copytree(src, inbox / "pydicom_testfiles")
    # 2. the good study
    gen = tmp_path_factory.mktemp("gen")
    good = generate_hn_study(gen, seed=21, folder_name="good", **SMALL_STUDY)
    shutil.copytree(good.study_dir, inbox / "good")
    bad = generate_hn_study(gen, seed=22, folder_name="bad_src", **SMALL_STUDY)
    own = inbox / "ours"
    # 3a. a study with a missing slice (gap) -> series quarantined, RT objects then dangle
    gap = own / "gap_study"
    shutil.copytree(bad.study_dir, gap)
    (gap / bad.ct_files[10].relative_to(bad.study_dir)).unlink()
    # 3b. duplicate position: a slice copied with a new SOP instance UID (its own study)
    dup_dir = own / "dup_position"
    for i, f in enumerate(bad.ct_files[:6]):
        ds = pydicom.dcmread(f)
        _restudy(ds, "dup")
        ds.SOPInstanceUID = _new_uid(f"dup-{i}")
        _save(ds, dup_dir / f"{i}.dcm")
    ds = pydicom.dcmread(bad.ct_files[2])
    _restudy(ds, "dup")
    ds.SOPInstanceUID = _new_uid("dup-extra")
    _save(ds, dup_dir / "extra.dcm")
    # 3c. mixed orientation in one series
    mixed = own / "mixed_orientation"
    for i, f in enumerate(bad.ct_files[:5]):
        ds = pydicom.dcmread(f)
        _restudy(ds, "mixed")
        if i == 2:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        _save(ds, mixed / f"{i}.dcm")
    # 3d. truncated pixel data (a one-slice study of its own)
    ds = pydicom.dcmread(bad.ct_files[0])
    _restudy(ds, "trunc")
    p = _save(ds, own / "truncated" / "slice.dcm")
    p.write_bytes(p.read_bytes()[:-1500])
    # 3e. missing required tags
    ds = pydicom.dcmread(bad.ct_files[1])
    _restudy(ds, "missing")
    del ds.ImagePositionPatient
    _save(ds, own / "missing_tags" / "slice.dcm")
    # 3f. burned-in annotation flag
    ds = pydicom.dcmread(bad.ct_files[3])
    _restudy(ds, "burned")
    ds.BurnedInAnnotation = "YES"
    _save(ds, own / "burned_in" / "slice.dcm")
    # 3g. an RTSTRUCT that references nothing we have
    ds = pydicom.dcmread(bad.rtstruct_file)
    _restudy(ds, "lonely-rs")
    _save(ds, own / "lonely_rtstruct" / "rs.dcm")
    # 3h. an exact duplicate of a good slice, resent in another folder
    shutil.copyfile(good.ct_files[5], own / "resent_copy.dcm")
    # 3i. garbage, empty, text, a gzip of a DICOM, a header cut in the middle
    (own / "garbage.dcm").write_bytes(os.urandom(4096))
    (own / "empty.dcm").write_bytes(b"")
    (own / "readme.txt").write_text("export log\n")
    (own / "slice.dcm.gz").write_bytes(gzip.compress(good.ct_files[0].read_bytes()))
    (own / "header_cut.dcm").write_bytes(good.ct_files[1].read_bytes()[:300])
    # 3j. NIfTI: a truncated gzip and an unrecognised sequence name
    nii = own / "nifti_case"
    nii.mkdir()
    brats_like = gzip.compress(b"\x5c\x01\x00\x00" + os.urandom(2000))
    (nii / "case-t1n.nii.gz").write_bytes(brats_like[: len(brats_like) // 2])
    (nii / "localizer.nii.gz").write_bytes(brats_like)
    # 3k. an OpenKBP patient folder without CT
    kbp = own / "openkbp_pt_x"
    kbp.mkdir()
    (kbp / "dose.csv").write_text(",data\n5,1.5\n6,2.0\n")
    (kbp / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    n_files = sum(1 for q in inbox.rglob("*") if q.is_file())
    return good, n_files


def test_hostile_inbox_accounts_for_every_file(storage, make_defs, instance, hostile_drop):
    good, n_files = hostile_drop
    defs = make_defs(storage)
    report = run_inbox_cycle(defs, instance)
    assert not report.failed, report.failed
    assert report.triage_runs == 1
    # the equation, for the whole drop ...
    assert report.files_seen == n_files
    assert report.files_seen == report.files_ingested + report.files_quarantined
    # ... and for every single run
    for res in report.results:
        for mat in res.get_asset_materialization_events():
            md = mat.materialization.metadata
            if "files_seen" in md:
                assert md["files_seen"].value == md["files_ingested"].value + md["files_quarantined"].value

    # the good study is complete
    files = pd.read_parquet(storage.tables / "file_index.parquet")
    good_key = Pseudonymizer().study("dcm", good.study_instance_uid)
    assert (files["study_key"] == good_key).sum() == len(good.ct_files) + 2
    manifest = pd.read_parquet(storage.tables / "volume_manifest.parquet")
    assert {"ct", "mask", "dose"} <= set(manifest.loc[manifest["study_key"] == good_key, "kind"])

    # quarantine table: one row per quarantined file, each file really in quarantine/
    q = pd.read_parquet(storage.tables / "quarantine_table.parquet")
    assert len(q) == report.files_quarantined
    assert q["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    for _, row in q.iterrows():
        folder = storage.quarantine / row["quarantine_ref"]
        assert (folder / "record.json").exists()
        assert any(p.name != "record.json" for p in folder.iterdir())
    expected = {
        "not_dicom",
        "unsupported_sop_class",
        "missing_required_tags",
        "truncated",
        "inconsistent_series",
        "dangling_reference",
        "duplicate_file",
        "duplicate_sop_instance",
        "burned_in_annotation",
        "unrecognised_sequence",
        "incomplete_patient",
    }
    assert expected <= set(q["reason"]), expected - set(q["reason"])
    # no reason detail quotes a file path or value
    assert not q["detail"].str.contains("/").any()

    # moved, not copied: what is left in the inbox is exactly what was ingested
    left = sum(1 for p in storage.inbox.rglob("*") if p.is_file() and ".psqa_index" not in p.parts)
    assert left == report.files_ingested

    # a second cycle finds nothing new to do
    again = run_inbox_cycle(defs, instance, cursor=report.cursor, rebuild_tables=False)
    assert again.results == []
