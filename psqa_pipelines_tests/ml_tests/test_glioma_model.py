"""GMMAS core: model shapes, missing sequences, Kendall weighting, CutMix labels, UPS, data checks, CLI."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ml.glioma.data import SEQUENCES, TASKS, load_dataset, read_labels
from ml.glioma.losses import KendallWeighting, one_hot_codes, seg_loss, soft_ce
from ml.glioma.model import GMMAS, ModelConfig
from ml.glioma.predict import aggregate, fit_temperature
from ml.glioma.slices import build_slices, cutmix, make_batch, random_drop
from ml.glioma.train import TrainConfig, class_weights

LGG = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "lgg-mri"
TINY = ModelConfig(widths=(4, 8, 8, 16), d_model=16, n_heads=2, n_layers=1, head_channels=4, head_hidden=8)


def _x(b=2, ctx=1, size=128):
    torch.manual_seed(0)
    return torch.randn(b, 4, 2 * ctx + 1, size, size)


@torch.no_grad()
def test_model_shapes_and_fusion_weights():
    m = GMMAS(TINY).eval()
    pres = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    out = m(_x(), pres)
    assert out["seg"].shape == (2, 2, 128, 128)
    for t, vocab in TASKS.items():
        assert out[t].shape == (2, len(vocab))
    w = out["weights"]
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert float(w[0, 3]) == 0.0 and float(w[1, 1:].sum()) == 0.0  # absent -> zero weight
    assert torch.allclose(w[0, :3], torch.full((3,), 1 / 3))  # w = exp(v - 1) = 1 at start


@torch.no_grad()
def test_absent_sequence_content_is_ignored():
    """A missing sequence is a zeroed fusion weight: whatever its channel holds cannot change the output."""
    m = GMMAS(TINY).eval()
    x = _x(1)
    pres = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    a = m(x, pres)
    x2 = x.clone()
    x2[:, 3] = 1000.0
    b = m(x2, pres)
    assert torch.allclose(a["idh"], b["idh"], atol=1e-5)
    # dropping a present sequence through ``drop`` does change it
    c = m(x, pres, torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    assert not torch.allclose(a["idh"], c["idh"], atol=1e-6)


@torch.no_grad()
def test_every_subset_runs():
    m = GMMAS(TINY).eval()
    for bits in range(1, 16):
        pres = torch.tensor([[(bits >> i) & 1 for i in range(4)]], dtype=torch.float32)
        out = m(_x(1), pres)
        assert torch.isfinite(out["seg"]).all() and torch.isfinite(out["idh"]).all()


def test_soft_ce_matches_cross_entropy_and_ignores_unknown():
    torch.manual_seed(1)
    logits = torch.randn(6, 3)
    codes = torch.tensor([0, 2, -1, 1, -1, 2])
    w = torch.tensor([1.0, 2.0, 0.5])
    ref = torch.nn.functional.cross_entropy(logits, codes, weight=w, ignore_index=-1)
    assert torch.allclose(soft_ce(logits, one_hot_codes(codes, 3), w), ref, atol=1e-6)
    assert float(soft_ce(logits, one_hot_codes(torch.full((6,), -1), 3))) == 0.0


def test_seg_loss_lower_for_right_mask():
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:10, 4:10] = 1
    good = torch.stack([-5 * (mask * 2 - 1), 5 * (mask * 2 - 1)], 1)
    bad = -good
    has = torch.tensor([True, True])
    assert float(seg_loss(good, mask, has)) < 0.05 < float(seg_loss(bad, mask, has))
    assert float(seg_loss(bad, mask, torch.tensor([False, False]))) == 0.0


def test_kendall_sigma_learns_task_noise():
    """sigma grows for the noisy task and shrinks for the clean one (Kendall et al.)."""
    torch.manual_seed(0)
    k = KendallWeighting(("clean", "noisy"))
    opt = torch.optim.Adam(k.parameters(), lr=0.05)
    for _ in range(300):
        loss = k({"clean": torch.tensor(0.1), "noisy": torch.tensor(4.0)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    s = k.sigmas()
    # optimum of 0.5 exp(-s) L + 0.5 s: exp(s) = L -> sigma = sqrt(L)
    assert s["clean"] == pytest.approx(0.1**0.5, rel=0.05)
    assert s["noisy"] == pytest.approx(2.0, rel=0.05)
    eq = KendallWeighting(("a", "b"), equal=True)
    assert float(eq({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})) == 3.0
    assert float(k({"clean": None, "noisy": None}).detach()) == 0.0  # no labelled samples: no regulariser pull


def test_class_weights_inverse_frequency():
    w = class_weights(torch.tensor([0, 0, 0, 1, -1]), 2)
    assert float(w[1] / w[0]) == pytest.approx(3.0)
    assert float(w.mean()) == pytest.approx(1.0)


def _patient(pid, labels, value, size=32, s=4, box=(8, 20, 8, 20)):
    from ml.glioma.data import Patient

    img = np.zeros((s, 4, size, size), np.float32)
    img[:, :3] = 0.1
    mask = np.zeros((s, size, size), np.uint8)
    r0, r1, c0, c1 = box
    mask[:, r0:r1, c0:c1] = 1
    img[:, :3, r0:r1, c0:c1] = value
    return Patient(pid, img, np.array([1, 1, 1, 0], bool), mask, np.arange(s), np.full(3, np.nan), labels)


def test_cutmix_soft_labels_are_pixel_proportions():
    a = _patient("A", {"histology": 0, "grade": 0, "idh": 1, "codel": 0}, 5.0)
    b = _patient("B", {"histology": 2, "grade": 1, "idh": 1, "codel": 1}, 9.0, box=(4, 24, 4, 24))
    data = build_slices([a, b])
    batch = make_batch(data, torch.tensor([0, 4]), context=0)
    gen = torch.Generator().manual_seed(3)
    before_a = int(batch["mask"][0].sum())
    batch, n = cutmix(batch, gen, p=1.0)
    assert n >= 1
    y = batch["y"]["histology"][0]
    assert float(y.sum()) == pytest.approx(1.0)
    # the share of B equals its pasted pixels among A's tumour after mixing
    pasted = int(((batch["x"][0, 0, 0] == 9.0) & (batch["mask"][0] > 0)).sum())
    total = int(batch["mask"][0].sum())
    assert total >= before_a
    assert float(y[2]) == pytest.approx(pasted / total, abs=1e-6)
    assert float(y[0]) == pytest.approx(1 - pasted / total, abs=1e-6)
    assert 0 < pasted < total
    # same IDH on both sides -> still one-hot
    assert torch.allclose(batch["y"]["idh"][0], torch.tensor([0.0, 1.0]))


def test_cutmix_unknown_label_stays_unknown():
    a = _patient("A", {"histology": -1, "grade": 0, "idh": 1, "codel": 0}, 5.0)
    b = _patient("B", {"histology": 2, "grade": 1, "idh": 1, "codel": 1}, 9.0)
    data = build_slices([a, b])
    batch, n = cutmix(make_batch(data, torch.tensor([0, 4]), 0), torch.Generator().manual_seed(0), p=1.0)
    assert n >= 1 and float(batch["y"]["histology"][0].sum()) == 0.0


def test_random_drop_keeps_one_sequence():
    pres = torch.tensor([[1, 1, 1, 0]] * 200 + [[1, 0, 0, 0]] * 10, dtype=torch.float32)
    keep = random_drop(pres, torch.Generator().manual_seed(0))
    kept = (pres * keep).sum(1)
    assert (kept >= 1).all()
    assert set(kept[:200].tolist()) == {1.0, 2.0, 3.0}
    frac_drop = float((kept[:200] < 3).float().mean())
    assert 0.35 < frac_drop < 0.65  # p(drop) = 0.5


def test_aggregate_area_weighted_and_fallback():
    logits = {"idh": torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])}
    area = torch.tensor([0, 10, 30])
    agg, sel = aggregate(torch.zeros(3, 4, 4), area, logits)
    assert sel.tolist() == [1, 2]
    assert torch.allclose(agg["idh"], torch.tensor([0.5, 3.0]))
    prob = torch.zeros(3, 4, 4)
    prob[0] = 0.4
    agg, sel = aggregate(prob, torch.zeros(3, dtype=torch.long), logits)
    assert len(sel) == 3 and int(sel[0]) == 0


def test_temperature_scaling_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    clean = np.where(rng.random(200) < 0.7, y, 1 - y)  # 70 % right
    logits = np.stack([-(clean * 2 - 1) * 4.0, (clean * 2 - 1) * 4.0], 1) / 2
    assert fit_temperature(logits, y) > 2.0
    assert fit_temperature(logits, np.full(200, -1)) == 1.0


def test_ups_selects_confident_low_uncertainty(monkeypatch):
    """UPS keeps a patient-level pseudo-label only when confidence >= tau_c and uncertainty < tau_u."""
    import ml.glioma.train as T
    from ml.glioma.predict import PatientOutput

    pats = [_patient(f"P{i}", {"histology": 0, "grade": 0, "idh": -1, "codel": 0}, 5.0) for i in range(3)]
    data = {"train": build_slices(pats), "val": build_slices(pats[:1])}
    cfg = TrainConfig(epochs=2, widths=TINY.widths, context=0)
    model = GMMAS(ModelConfig(**{**TINY.to_dict(), "widths": TINY.widths, "context": 0}))
    task = T.GliomaTask(cfg, model, data, torch.device("cpu"))

    def out(pid, p, u):
        probs = {"grade": np.array([0.5, 0.5]), "codel": np.array([0.5, 0.5]), "histology": np.full(3, 1 / 3)}
        probs["idh"] = np.array([1 - p, p])
        unc = dict.fromkeys(TASKS, 0.0)
        unc["idh"] = u
        return PatientOutput(pid, np.zeros((4, 32, 32), np.uint8), {}, probs, unc, 1)

    outs = [out("P0", 0.95, 0.01), out("P1", 0.95, 0.2), out("P2", 0.6, 0.0)]
    calls = []

    def fake_predict(lm, sub, mc, seed=0, **kw):
        calls.append((mc, list(sub.patient_ids)))
        return outs

    monkeypatch.setattr(T, "predict_patients", fake_predict)
    task._pseudo_label()
    assert calls == [(10, ["P0", "P1", "P2"])]  # 10 MC-dropout passes over the patients lacking a label
    assert task.pseudo["idh"] == {"P0": 1}
    assert task.codes["idh"].tolist() == [1, -1, -1]
    assert task.codes["grade"].tolist() == [0, 0, 0]  # known labels untouched


def test_labels_outside_vocabulary_become_unknown(tmp_path):
    (tmp_path / "labels.csv").write_text(
        "patient_id,histology,grade,idh_status,codeletion_1p19q,missing_sequences\n"
        "A,astrocytoma,G4,Mutant,codel,\nB,glioblastoma,G2,wt,,post-contrast\n"
    )
    labels, issues = read_labels(tmp_path / "labels.csv")
    assert labels.set_index("patient_id").loc["A", ["histology", "grade", "idh", "codel"]].tolist() == [0, -1, 1, 1]
    assert labels.set_index("patient_id").loc["B", ["histology", "grade", "idh", "codel"]].tolist() == [-1, 0, 0, -1]
    assert {i["reason"] for i in issues} == {"label_outside_vocabulary"} and len(issues) == 2


def test_bad_patients_are_issues_not_crashes(tmp_path):
    pdir = tmp_path / "patients"
    pdir.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (3, 3, 16, 16)).astype(np.uint8)
    np.savez_compressed(pdir / "good.npz", image=img, mask=np.zeros((3, 16, 16), np.uint8))
    np.savez_compressed(pdir / "badmask.npz", image=img, mask=np.zeros((3, 8, 8), np.uint8))
    np.savez_compressed(pdir / "badch.npz", image=img[:, :2], mask=np.zeros((3, 16, 16), np.uint8))
    (pdir / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    with zipfile.ZipFile(pdir / "noimage.npz", "w") as z:
        z.writestr("x.npy", b"")
    (tmp_path / "labels.csv").write_text(
        "patient_id,histology,grade,idh_status,codeletion_1p19q,missing_sequences\ngood,astrocytoma,G2,WT,,pre-contrast\n"
    )
    ds = load_dataset(tmp_path)
    assert ds.ids() == ["good"]
    reasons = {i["patient_id"]: i["reason"] for i in ds.issues}
    assert reasons == {
        "badmask": "mask_shape_mismatch",
        "badch": "bad_channel_count",
        "corrupt": "corrupt_npz",
        "noimage": "corrupt_npz",
    }
    p = ds.patients[0]
    # pre-contrast missing -> t1 absent; t2 absent in lgg; flair and t1c present
    assert p.present.tolist() == [True, True, False, False]
    assert np.all(p.image[:, SEQUENCES.index("t1")] == 0)
    fg = p.image[:, 0][img[:, 1] > 0]
    assert abs(float(fg.mean())) < 1e-4 and float(fg.std()) == pytest.approx(1.0, rel=1e-3)


IDS = ["TCGA-CS-4942", "TCGA-CS-4943", "TCGA-CS-4944", "TCGA-CS-5393", "TCGA-CS-5395", "TCGA-CS-5396"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """``python -m ml glioma train`` for one short epoch on 6 real patients (tiny widths)."""
    if not LGG.is_dir():
        pytest.skip("../shared/datasets/lgg-mri not present")
    from ml.cli import main

    tmp = tmp_path_factory.mktemp("glioma")
    data = tmp / "data"
    (data / "patients").mkdir(parents=True)
    for pid in IDS:
        (data / "patients" / f"{pid}.npz").symlink_to(LGG / "patients" / f"{pid}.npz")
    lab = pd.read_csv(LGG / "labels.csv")
    lab[lab["patient_id"].isin(IDS)].to_csv(data / "labels.csv", index=False)
    model = tmp / "model"
    rc = main(
        ["glioma", "train", "--data", str(data), "--out", str(model), "--epochs", "1", "--widths", "4,8,8,16",
         "--batch-size", "4", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    return model


def test_cli_round_trip_on_real_patients(tiny_model, tmp_path):
    """Train (fixture), then predict 2 real patients from a dir without labels; check the outputs."""
    from ml.cli import main

    model = tiny_model
    for name in ("config.json", "model_best.pt", "history.csv", "metrics.json", "calibration.json"):
        assert (model / name).exists(), name
    hist = pd.read_csv(model / "history.csv")
    assert {"sigma_seg", "sigma_idh", "w_flair", "w_t2", "val_dice"} <= set(hist.columns)
    # modal significance over the sequences seen in training: lgg-mri has no T2
    assert (hist["w_t2"] == 0).all()
    assert np.allclose(hist[["w_flair", "w_t1c", "w_t1"]].sum(1), 1.0, atol=1e-6)
    pdata = tmp_path / "unlabelled"
    (pdata / "patients").mkdir(parents=True)
    for pid in IDS[:2]:
        (pdata / "patients" / f"{pid}.npz").symlink_to(LGG / "patients" / f"{pid}.npz")
    pred = tmp_path / "pred"
    assert (
        main(["glioma", "predict", "--data", str(pdata), "--model", str(model), "--out", str(pred), "--mc", "3"]) == 0
    )
    df = pd.read_csv(pred / "predictions.csv")
    assert list(df.columns[:8]) == [
        "patient_id",
        "fold",
        "p_idh_mutant",
        "p_codel",
        "p_grade_g3",
        "p_oligodendroglioma",
        "p_astrocytoma",
        "p_oligoastrocytoma",
    ]
    assert sorted(df["patient_id"]) == IDS[:2]
    hist_cols = ["p_oligodendroglioma", "p_astrocytoma", "p_oligoastrocytoma"]
    assert np.allclose(df[hist_cols].sum(1), 1.0, atol=1e-5)
    assert df[["p_idh_mutant", "p_codel", "p_grade_g3"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (df["u_idh"] >= 0).all()
    for pid in IDS[:2]:
        with np.load(pred / "masks" / f"{pid}.npz") as z:
            m = z["mask"]
        with np.load(LGG / "patients" / f"{pid}.npz") as z:
            assert m.shape == z["mask"].shape and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert json.loads((model / "metrics.json").read_text())["n_parameters"] > 0


BRATS = LGG.parent / "brain-mri-samples" / "tcga-skullstripped" / "TCGA-DU-7294"


def test_nifti_predict_writes_label_on_input_grid(tiny_model, tmp_path):
    """3D path: a real BraTS-layout case -> a 0/1 label NIfTI on the reference sequence's grid."""
    if not BRATS.is_dir():
        pytest.skip("brain-mri-samples not present")
    import nibabel as nib

    from ml.cli import main

    case = tmp_path / "case"
    case.mkdir()
    for f in BRATS.glob("*.nii.gz"):
        if "seg" not in f.name:
            (case / f.name).symlink_to(f)
    out = tmp_path / "label.nii.gz"
    assert main(["glioma", "predict", "--nifti", str(case), "--model", str(tiny_model), "--out", str(out)]) == 0
    lab = nib.load(str(out))
    ref = nib.load(str(next(BRATS.glob("*_t1c_bet.nii.gz"))))
    assert lab.shape == ref.shape
    assert np.allclose(np.abs(np.diag(lab.affine))[:3], np.abs(np.diag(ref.affine))[:3], atol=1e-3)
    assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1}


def test_clean_mask_drops_small_components():
    from ml.glioma.predict import clean_mask

    m = np.zeros((5, 20, 20), np.uint8)
    m[1:4, 5:12, 5:12] = 1  # 147 voxels
    m[0, 0:2, 0:2] = 1  # 4 voxels: < 10 % -> removed
    m[4, 15:19, 15:19] = 1  # 16 voxels: >= 10 % -> kept
    out = clean_mask(m)
    assert int(out.sum()) == 147 + 16 and out[0, 0, 0] == 0
    assert clean_mask(np.zeros((2, 4, 4), np.uint8)).sum() == 0


def test_cli_cv_writes_out_of_fold_predictions(tmp_path):
    """``python -m ml glioma cv`` on 8 real patients, 2 folds: every labelled patient predicted once,
    by the fold model that did not train on it; the missing-sequence subsets are written."""
    if not LGG.is_dir():
        pytest.skip("../shared/datasets/lgg-mri not present")
    from ml.cli import main

    lab = pd.read_csv(LGG / "labels.csv")
    ids = list(lab.sort_values(["n_slices", "patient_id"])["patient_id"][:8])  # 20-slice patients: fast
    data = tmp_path / "data"
    (data / "patients").mkdir(parents=True)
    for pid in ids:
        (data / "patients" / f"{pid}.npz").symlink_to(LGG / "patients" / f"{pid}.npz")
    lab[lab["patient_id"].isin(ids)].to_csv(data / "labels.csv", index=False)
    folds = pd.DataFrame({"patient_id": ids, "fold": [i % 2 for i in range(8)]})
    folds.to_csv(tmp_path / "folds.csv", index=False)
    out = tmp_path / "cv"
    rc = main(
        ["glioma", "cv", "--data", str(data), "--out", str(out), "--folds-file", str(tmp_path / "folds.csv"),
         "--epochs", "1", "--widths", "4,8,8,16", "--batch-size", "4", "--device", "cpu", "--no-distill"]
    )  # fmt: skip
    assert rc == 0
    oof = pd.read_csv(out / "gmmas" / "oof.csv")
    assert sorted(oof["patient_id"]) == sorted(ids)
    for k in (0, 1):
        cfg = json.loads((out / "gmmas" / f"fold{k}" / "config.json").read_text())
        trained_on = set(cfg["split"]["train"]) | set(cfg["split"]["val"])
        held_out = set(oof.loc[oof["fold"] == k, "patient_id"])
        assert held_out == {p for p, f in zip(folds["patient_id"], folds["fold"], strict=True) if f == k}
        assert not trained_on & held_out
    assert len(list((out / "gmmas").glob("fold0/missing_*.csv"))) >= 3
    assert oof["dice"].between(0, 1).all()


def test_withheld_labels_hidden_in_training_only(tmp_path):
    """``withhold_labels`` hides labels of a fraction of the training patients for that run only: the
    Dataset (reused by every CV fold) keeps them, and the withheld patients train unlabelled."""
    from ml.glioma.data import Dataset
    from ml.glioma.train import train

    pats = [
        _patient(f"P{i}", {"histology": i % 3, "grade": i % 2, "idh": 1, "codel": i % 2}, 5.0 + i) for i in range(6)
    ]
    labels = pd.DataFrame([{"patient_id": p.patient_id, **p.labels} for p in pats])
    ds = Dataset(pats, labels, [])
    before = [dict(p.labels) for p in pats]
    cfg = TrainConfig(
        epochs=1, widths=(4, 8, 8, 16), context=0, batch_size=4, withhold_labels=0.5, device="cpu", calibrate=False
    )
    train(ds, tmp_path / "m", cfg, train_ids=[p.patient_id for p in pats[:4]], val_ids=["P4", "P5"], log=lambda s: None)
    assert [p.labels for p in pats] == before
    withheld = json.loads((tmp_path / "m" / "config.json").read_text())["split"]["withheld_labels"]
    assert len(withheld) == 2 and set(withheld) <= {"P0", "P1", "P2", "P3"}
    pl = pd.read_csv(tmp_path / "m" / "pseudo_labels.csv")
    assert list(pl.columns) == ["patient_id", "task", "label"]
    assert set(pl["patient_id"]) <= set(withheld)  # only patients without labels get pseudo-labels
