"""ml.glioma.lake on real data: lgg-mri patients and brain-mri-samples cases into a temporary lake
(de-identified NIfTI, manifest, label table), idempotent reruns, bad input to quarantine, and the
export back to the shared training layout (exact round trip for lgg-mri)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ml.data.dicom.deid import Pseudonymizer
from ml.data.phi import DATE_LIKE, PATIENT_ID, table_phi_violations
from ml.data.quarantine import Quarantine
from ml.glioma.data import LGG_CHANNELS, SEQUENCES, load_dataset
from ml.glioma.lake import export_training_dir, import_brain_samples, import_lgg
from psqa_pipelines_tests.conftest import BRAIN_DIR, SHARED, needs_brain

LGG_DIR = SHARED / "datasets" / "lgg-mri"
needs_lgg = pytest.mark.skipif(not LGG_DIR.is_dir(), reason="needs ../shared lgg-mri data (absent)")

# one complete patient, one without post-contrast, one FLAIR-only with unknown histology/grade
PATIENTS = ("TCGA-CS-4942", "TCGA-DU-7301", "TCGA-HT-A61B")


def _lgg_subset(dest: Path, patients=PATIENTS) -> Path:
    (dest / "patients").mkdir(parents=True)
    for pid in patients:
        (dest / "patients" / f"{pid}.npz").symlink_to(LGG_DIR / "patients" / f"{pid}.npz")
    labels = pd.read_csv(LGG_DIR / "labels.csv", dtype=str, keep_default_na=False)
    labels[labels["patient_id"].isin(patients)].to_csv(dest / "labels.csv", index=False)
    return dest


def _source(pid: str) -> dict[str, np.ndarray]:
    with np.load(LGG_DIR / "patients" / f"{pid}.npz") as z:
        return {k: z[k] for k in z.files}


def _header_text(path: Path) -> str:
    h = nib.load(str(path)).header
    fields = ("descrip", "aux_file", "db_name", "intent_name")
    return " ".join(bytes(h[k].tobytes()).decode("latin-1").strip("\x00 ") for k in fields).strip()


@needs_lgg
def test_import_lgg_writes_deidentified_volumes_and_labels(tmp_path):
    src = _lgg_subset(tmp_path / "src")
    lake = tmp_path / "lake"
    p = Pseudonymizer()
    res = import_lgg(src, lake, p, Quarantine(tmp_path / "q"))
    assert not res.quarantined
    pids = {pid: p.patient(f"lgg-mri:{pid}") for pid in PATIENTS}
    assert set(res.labels["patient_id"]) == set(pids.values())
    assert all(PATIENT_ID.match(x) for x in res.manifest["patient_id"])
    assert table_phi_violations(res.manifest) == [] and table_phi_violations(res.labels) == []

    expected_seqs = {
        "TCGA-CS-4942": {"t1", "flair", "t1c", "seg"},
        "TCGA-DU-7301": {"t1", "flair", "seg"},  # post-contrast missing -> no t1c
        "TCGA-HT-A61B": {"flair", "seg"},  # FLAIR only
    }
    for pid, pseud in pids.items():
        rows = res.manifest[res.manifest["patient_id"] == pseud]
        assert set(rows["sequence"]) == expected_seqs[pid]
        assert not rows["spacing_known"].any() and set(rows["layout"]) == {"slices"}
        src_arrays = _source(pid)
        s = src_arrays["image"].shape[0]
        for r in rows.to_dict("records"):
            path = lake / r["path"]
            assert pid not in r["path"] and "TCGA" not in r["path"]
            img = nib.load(str(path))
            assert img.shape == (128, 128, s) and r["shape"] == f"128x128x{s}"
            assert _header_text(path) == ""
            assert not DATE_LIKE.search(str(img.header))
        flair = nib.load(str(lake / rows.loc[rows["sequence"] == "flair", "path"].iloc[0])).get_fdata()
        assert np.array_equal(flair.transpose(2, 1, 0), src_arrays["image"][:, 1])

    lab = res.labels.set_index("patient_id")
    a = lab.loc[pids["TCGA-CS-4942"]]
    assert (a["source"], a["histology"], a["grade"], a["idh"], a["codel"]) == (
        "lgg-mri",
        "astrocytoma",
        "G3",
        "Mutant",
        "non-codel",
    )
    assert (a["n_slices"], a["n_tumour_slices"], a["missing_sequences"]) == (20, 6, "t2")
    b = lab.loc[pids["TCGA-HT-A61B"]]
    assert pd.isna(b["histology"]) and pd.isna(b["grade"]) and b["idh"] == "Mutant" and b["codel"] == "non-codel"
    assert b["missing_sequences"] == "t1c;t1;t2" and b["n_slices"] == 88
    assert lab.loc[pids["TCGA-DU-7301"], "missing_sequences"] == "t1c;t2"
    assert res.issues.empty

    # idempotent: a rerun writes nothing and returns the same tables
    files = sorted(p for p in (lake / "glioma").rglob("*") if p.is_file())
    before = {f: f.stat().st_mtime_ns for f in files}
    again = import_lgg(src, lake, p, Quarantine(tmp_path / "q"))
    pd.testing.assert_frame_equal(again.manifest, res.manifest)
    pd.testing.assert_frame_equal(again.labels, res.labels)
    assert sorted(p for p in (lake / "glioma").rglob("*") if p.is_file()) == files
    assert {f: f.stat().st_mtime_ns for f in files} == before


@needs_lgg
def test_bad_lgg_input_is_quarantined_and_the_run_continues(tmp_path):
    src = _lgg_subset(tmp_path / "src", patients=("TCGA-CS-4942",))
    good = _source("TCGA-CS-4942")
    (src / "patients" / "BAD-CORRUPT.npz").write_bytes(b"PK\x03\x04 this is not a zip file")
    np.savez_compressed(src / "patients" / "BAD-MASK.npz", image=good["image"], mask=good["mask"][:, :64])
    np.savez_compressed(src / "patients" / "BAD-CHANNELS.npz", image=good["image"][:, :2], mask=good["mask"])
    labels = pd.read_csv(src / "labels.csv", dtype=str, keep_default_na=False)
    labels.loc[0, "idh_status"] = "probably"
    labels.to_csv(src / "labels.csv", index=False)

    q = Quarantine(tmp_path / "q")
    p = Pseudonymizer()
    res = import_lgg(src, tmp_path / "lake", p, q)
    reasons = sorted(r.reason for r in res.quarantined)
    assert reasons == ["invalid_content", "invalid_content", "unreadable"]
    assert all(r.action == "copied" for r in res.quarantined)
    assert all((q.dir / r.quarantine_ref / "record.json").exists() for r in res.quarantined)
    assert (src / "patients" / "BAD-MASK.npz").exists()  # read-only source: copied, never moved
    assert all("BAD" not in r.detail for r in res.quarantined)  # details name the pseudonym only

    pid = p.patient("lgg-mri:TCGA-CS-4942")
    assert list(res.labels["patient_id"]) == [pid]
    row = res.labels.iloc[0]
    assert pd.isna(row["idh"]) and row["histology"] == "astrocytoma"
    issue = res.issues[res.issues["reason"] == "label_outside_vocabulary"]
    assert list(issue["patient_id"]) == [pid]
    no_label = res.issues[res.issues["reason"] == "no_label_row"]
    assert len(no_label) == 0  # quarantined patients are not reported twice
    assert set(res.manifest["patient_id"]) == {pid}


@needs_lgg
def test_export_round_trip_reproduces_the_lgg_arrays(tmp_path):
    src = _lgg_subset(tmp_path / "src")
    lake, out = tmp_path / "lake", tmp_path / "train"
    p = Pseudonymizer()
    res = import_lgg(src, lake, p, Quarantine(tmp_path / "q"))
    index = export_training_dir(res.manifest, res.labels, lake, out)
    assert len(index) == 3
    for pid in PATIENTS:
        pseud = p.patient(f"lgg-mri:{pid}")
        srcz = _source(pid)
        with np.load(out / "patients" / f"{pseud}.npz") as z:
            image, present, mask = z["image"], z["present"], z["mask"]
            assert image.dtype == np.float32 and image.shape == (srcz["image"].shape[0], 4, 128, 128)
            assert mask.dtype == np.uint8 and np.array_equal(mask, srcz["mask"])
            assert np.array_equal(z["slice_index"], srcz["slice_index"])
            assert np.isnan(z["spacing"]).all() and z["spacing"].shape == (3,)
            assert tuple(z["sequences"]) == SEQUENCES
        rows = res.manifest[res.manifest["patient_id"] == pseud]
        for ch, seq in LGG_CHANNELS.items():
            c = SEQUENCES.index(seq)
            if seq in set(rows["sequence"]):
                assert present[c] and np.array_equal(image[:, c], srcz["image"][:, ch].astype(np.float32))
            else:
                assert not present[c] and not image[:, c].any()
        assert not present[SEQUENCES.index("t2")] and not image[:, SEQUENCES.index("t2")].any()

    labels = pd.read_csv(out / "labels.csv", dtype=str, keep_default_na=False)
    assert list(labels.columns) == [
        "patient_id",
        "histology",
        "grade",
        "idh_status",
        "codeletion_1p19q",
        "missing_sequences",
    ]
    assert labels.set_index("patient_id").loc[p.patient("lgg-mri:TCGA-HT-A61B"), "histology"] == ""

    # deterministic, and readable by the training data loader
    first = {f.name: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}
    export_training_dir(res.manifest, res.labels, lake, out)
    assert {f.name: f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()} == first
    ds = load_dataset(out)
    assert len(ds.patients) == 3 and not ds.issues
    assert {p.patient_id: p.labels["idh"] for p in ds.patients}[p.patient("lgg-mri:TCGA-CS-4942")] == 1


@needs_brain
def test_brain_samples_into_the_lake_and_out(tmp_path):
    src = tmp_path / "brain"
    (src / "tcga-skullstripped").mkdir(parents=True)
    (src / "tcga-skullstripped" / "TCGA-DU-7294").symlink_to(BRAIN_DIR / "tcga-skullstripped" / "TCGA-DU-7294")
    native_src = BRAIN_DIR / "native-space" / "TCGA-FG-6692"
    (src / "native-space" / "TCGA-FG-6692").mkdir(parents=True)
    for f in sorted(native_src.iterdir()):
        if f.name.endswith(("_t1c.nii.gz", "_fla.nii.gz")):  # two sequences on different grids are enough
            shutil.copy(f, src / "native-space" / "TCGA-FG-6692" / f.name)
    (src / "native-space" / "TCGA-FG-6692" / "notes_localizer.nii.gz").write_bytes(b"\x1f\x8b garbage")
    lake, out = tmp_path / "lake", tmp_path / "train"
    p = Pseudonymizer()
    q = Quarantine(tmp_path / "q")
    res = import_brain_samples(src, lake, p, q, rigid=False)
    assert [r.reason for r in res.quarantined] == ["unrecognised_sequence"]
    assert set(res.labels["source"]) == {"brain-mri-samples"} and len(res.labels) == 2
    assert res.labels[["histology", "grade", "idh", "codel"]].isna().all().all()
    assert table_phi_violations(res.manifest) == [] and table_phi_violations(res.labels) == []
    assert res.manifest["spacing_known"].all() and set(res.manifest["layout"]) == {"volume"}

    ss = p.patient("brain-mri-samples:tcga-skullstripped/TCGA-DU-7294")
    native = p.patient("brain-mri-samples:native-space/TCGA-FG-6692")
    m = res.manifest.set_index(["patient_id", "sequence"])
    assert set(m.loc[ss].index) == {"flair", "seg", "t1", "t1c", "t2"}
    assert set(m.loc[native].index) == {"flair", "t1c"}
    assert len(set(m.loc[native, "shape"])) == 1  # co-registered onto one grid
    seg = np.asarray(nib.load(str(lake / m.loc[(ss, "seg"), "path"])).dataobj)
    assert set(np.unique(seg)) == {0, 1}  # BraTS 1/2/4 -> whole tumour
    assert res.labels.set_index("patient_id").loc[ss, "n_tumour_slices"] > 0
    # the same person in two sources shares the subject pseudonym
    assert res.labels.set_index("patient_id").loc[ss, "subject_id"] == p.patient("tcga:TCGA-DU-7294")

    again = import_brain_samples(src, lake, p, q, rigid=False)
    pd.testing.assert_frame_equal(again.manifest, res.manifest)

    index = export_training_dir(res.manifest, res.labels, lake, out, size=64).set_index("patient_id")
    assert bool(index.loc[ss, "has_mask"]) and not bool(index.loc[native, "has_mask"])
    with np.load(out / "patients" / f"{ss}.npz") as z:
        assert z["image"].shape[1:] == (4, 64, 64) and z["present"].all()
        assert 0 < z["image"].shape[0] < 155  # slices without brain dropped
        assert z["mask"].shape == (z["image"].shape[0], 64, 64) and z["mask"].any()
        assert np.allclose(z["spacing"], [240 / 64, 240 / 64, 1.0])
