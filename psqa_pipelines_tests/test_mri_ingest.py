"""MRI through the pipeline: DICOM MR series (synthetic, 4 sequences, FLAIR on its own grid)
and the real NIfTI samples (BraTS layout; TCGA in native scanner space)."""

import shutil

import numpy as np
import pandas as pd
from scipy import ndimage

from ml.data.dicom.deid import Pseudonymizer
from ml.data.synthetic import generate_mr_study
from ml.data.volume import read_nifti
from psqa_pipelines.runner import run_inbox_cycle
from psqa_pipelines_tests.conftest import BRAIN_DIR, needs_brain


def _manifest(storage, key):
    m = pd.read_parquet(storage.tables / "volume_manifest.parquet")
    return m[m["study_key"] == key].set_index("name")


def test_dicom_mr_series_are_labelled_coregistered_and_normalised(storage, make_defs, instance):
    truth = generate_mr_study(storage.inbox, seed=4, matrix=64, pixel_spacing_mm=3.3, n_slices=28)
    report = run_inbox_cycle(make_defs(storage), instance)
    key = Pseudonymizer().study("dcm", truth.study_instance_uid)
    assert report.studies == [key] and report.files_quarantined == 0
    series = pd.read_parquet(storage.tables / "series_index.parquet")
    assert sorted(series["sequence"]) == ["flair", "t1", "t1c", "t2"]
    m = _manifest(storage, key)
    assert set(m.index) == {"t1", "t1c", "t2", "flair"}
    assert m["grid_id"].nunique() == 1  # all on the T1c grid, FLAIR included
    vols = {s: read_nifti(storage.lake / m.loc[s, "path"]).array for s in m.index}
    t1c = vols["t1c"]
    assert t1c.shape == truth.label_map.shape
    brain = t1c != 0
    assert abs(float(t1c[brain].mean())) < 1e-3 and abs(float(t1c[brain].std()) - 1) < 1e-3
    # contrasts survive: enhancing rim brightest on T1c, oedema bright on FLAIR
    rim, oedema = truth.label_map == 3, truth.label_map == 2
    assert t1c[rim].mean() > t1c[brain].mean() + 1.0
    assert vols["flair"][oedema].mean() > vols["flair"][brain].mean() + 0.5
    study = pd.read_parquet(storage.tables / "study_index.parquet").set_index("study_key")
    assert study.loc[key, "mr_sequences"] == "flair,t1,t1c,t2"


@needs_brain
def test_real_brats_and_native_space_cases(storage, make_defs, instance):
    shutil.copytree(BRAIN_DIR / "brats2023-layout" / "BraTS-GLI-00001-000", storage.inbox / "BraTS-GLI-00001-000")
    shutil.copytree(BRAIN_DIR / "native-space" / "TCGA-FG-6692", storage.inbox / "TCGA-FG-6692")
    report = run_inbox_cycle(make_defs(storage), instance)
    assert len(report.studies) == 2 and not report.failed and report.files_quarantined == 0
    p = Pseudonymizer()
    brats = _manifest(storage, p.study("nii", "BraTS-GLI-00001-000"))
    assert set(brats.index) == {"t1", "t1c", "t2", "flair"} and brats["shape_x"].iloc[0] == 240
    native = _manifest(storage, p.study("nii", "TCGA-FG-6692"))
    assert set(native.index) == {"t1", "t1c", "t2", "flair"} and native["grid_id"].nunique() == 1
    vols = {s: read_nifti(storage.lake / native.loc[s, "path"]).array for s in native.index}

    # contrast-independent alignment measure: correlation of gradient magnitudes (edges)
    def edges(a):
        return np.sqrt(sum(g * g for g in np.gradient(a.astype(np.float32))))

    inner = ndimage.binary_erosion(vols["t1c"] != 0, iterations=3)
    ref = edges(vols["t1c"])[inner]
    for seq in ("t1", "t2", "flair"):
        e = edges(vols[seq])
        r = np.corrcoef(ref, e[inner])[0, 1]
        # the registered position beats every 3-voxel in-plane displacement of itself
        shifted = [np.corrcoef(ref, np.roll(e, k, axis=ax)[inner])[0, 1] for ax in (1, 2) for k in (-3, 3)]
        assert r > 0.4 and r > max(shifted), (seq, r, shifted)
    files = pd.read_parquet(storage.tables / "file_index.parquet")
    assert not files["stored_path"].str.contains("TCGA|BraTS", regex=True).any()
