"""Scientific fidelity of the contour + dose family (issue 13, CTAN items 1-4): partial labels,
rare/small organs (oversampling, class weights, soft-tissue window), model selection on every
validation patient and out-of-fold Seq-Automated masks. The bottleneck's positional encoding
(item 4) is in ``test_contour_dose_ctab.py``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ml.contour_dose.cache import Cache, pack_arrays, write_entry, write_index
from ml.contour_dose.losses import combo_loss, inverse_sqrt_frequency, marginal_ce, soft_dice_loss
from ml.contour_dose.models import build_model
from ml.contour_dose.slices import augment, build_slices, epoch_order, make_batch
from ml.contour_dose.train import TrainConfig, model_config, task_losses, train, validate
from ml.contour_dose.variants import PAPER_ROIS, PRODUCT_ROIS, RARE_ROIS, VARIANTS, in_channels
from psqa_pipelines_tests.ml_tests.test_contour_dose import TINY, synthetic_patient

QUIET = {"log": lambda *_: None}


def _cache(root: Path, n: int, drop: dict[int, tuple[str, ...]] | None = None) -> Path:
    """n synthetic patients; ``drop[i]``: ROIs not contoured for patient i (absent from its structure set)."""
    rows = []
    for i in range(n):
        ct, body, rois, dose = synthetic_patient(i)
        for name in (drop or {}).get(i, ()):
            rois.pop(name)
        pid = f"pt_{i + 1}"
        rows.append(write_entry(root, pid, pack_arrays(pid, ct, body, rois, dose, (4, 4, 2.5))))
    write_index(root, rows, source="synthetic")
    return root


def _split(train: list[int], val: list[int], test: list[int] = ()) -> pd.DataFrame:
    rows = [(f"pt_{i}", "train") for i in train] + [(f"pt_{i}", "val") for i in val]
    rows += [(f"pt_{i}", "test") for i in test]
    return pd.DataFrame(rows, columns=["patient_id", "split"])


def _cfg(**kw) -> TrainConfig:
    base = dict(variant="multi-automated", epochs=2, steps_per_epoch=2, batch_size=4, widths=TINY, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------
# 1. partial labels
# ---------------------------------------------------------------------------------------
def test_annotation_flags_travel_with_the_slices_and_swap_with_a_flip(tmp_path):
    cache = Cache.open(_cache(tmp_path, 2, drop={1: ("Brainstem", "LeftParotid")}))
    data = build_slices([cache.load("pt_1"), cache.load("pt_2")], PAPER_ROIS, 0.0, 500.0)
    (_, a1, _), (_, a2, b2) = data.patient_slices
    assert data.annotated[a1].tolist() == [True, True, True, True]
    # PAPER_ROIS = Brainstem, SpinalCord, LeftParotid, RightParotid
    assert data.annotated[a2:b2].tolist() == [[False, True, False, True]] * (b2 - a2)
    batch = make_batch(data, torch.tensor([a2, a2 + 1]), "contour-only")
    assert batch["annotated"].tolist() == [[False, True, False, True]] * 2
    flipped = augment(batch, "contour-only", torch.Generator().manual_seed(0), p_affine=0.0, p_flip=1.0)
    # mirrored, the unannotated LeftParotid side is now the RightParotid side
    assert flipped["annotated"].tolist() == [[False, True, True, False]] * 2


def _partial_batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5] = 2  # SpinalCord in both samples
    labels[1, 5:7, 5:7] = 1  # Brainstem in sample 1 only
    annotated = torch.tensor([[False, True, True, True], [True, True, True, True]])  # no Brainstem contour in 0
    return logits, labels, annotated


def test_an_unannotated_organ_is_not_taught_as_background():
    """Sample 0's patient has no Brainstem contour. The loss may not push its Brainstem logit down
    where the label map says background (old loss: CE and Dice both did); sample 1, annotated and
    without Brainstem there, is still taught background."""
    logits, labels, annotated = _partial_batch()
    loss = task_losses({"contour": logits}, {"label": labels, "annotated": annotated})["contour"]
    loss.backward()
    g = logits.grad
    bg0, bg1 = labels[0] == 0, labels[1] == 0
    assert (g[0, 1][bg0] <= 1e-9).all(), g[0, 1][bg0].max()  # never pushed down (descent: -grad >= 0)
    assert (g[1, 1][bg1] > 0).all()  # annotated and absent: pushed down as before
    assert (g[0, 1][labels[0] == 2] > 0).all()  # a SpinalCord voxel is still not Brainstem


def test_marginal_ce_merges_unannotated_classes_into_background_and_equals_ce_when_complete():
    logits, labels, annotated = _partial_batch()
    z = logits.detach()
    p = torch.softmax(z, 1)
    # sample 0, background voxels: -log(p_bg + p_Brainstem); elsewhere the ordinary -log p_y
    nll = -torch.log(p.gather(1, labels[:, None])[:, 0])
    nll[0][labels[0] == 0] = -torch.log(p[0, 0] + p[0, 1])[labels[0] == 0]
    assert float(marginal_ce(z, labels, annotated)) == pytest.approx(float(nll.mean()), rel=1e-5)
    full = torch.ones_like(annotated)
    assert float(marginal_ce(z, labels, full)) == pytest.approx(float(F.cross_entropy(z, labels)), rel=1e-6)
    assert float(soft_dice_loss(z, labels, annotated=full)) == pytest.approx(float(soft_dice_loss(z, labels)))
    assert float(combo_loss(z, labels, annotated=full)) == pytest.approx(float(combo_loss(z, labels)), rel=1e-6)
    # Brainstem's Dice pools sample 1 only: sample 0's Brainstem probabilities do not enter it
    z2 = z.clone()
    z2[0, 1] += 5.0
    d1 = soft_dice_loss(z, labels, annotated=annotated)
    d2 = soft_dice_loss(z2, labels, annotated=annotated)
    only_bs = torch.tensor([[False, False, False, False], [True, False, False, False]])
    assert float(soft_dice_loss(z, labels, annotated=only_bs)) == pytest.approx(
        float(soft_dice_loss(z2, labels, annotated=only_bs))
    )
    assert float(d1) != float(d2)  # (through the other classes' softmax only)


class _FixedContour(torch.nn.Module):
    """Predicts the same label map on every slice: Brainstem in a block, background elsewhere."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        logits = torch.zeros(len(PAPER_ROIS) + 1, h, w)
        logits[0] = 5.0
        logits[1, 20:40, 20:40] = 10.0
        self.register_buffer("logits", logits)

    def forward(self, x):
        return {"contour": self.logits.expand(x.shape[0], -1, -1, -1)}


def test_validation_dice_skips_an_roi_the_patient_has_no_contour_for(tmp_path):
    """pt_2 has no Brainstem contour: its Brainstem Dice is not counted (old code: 0, as if the
    model had contoured an organ that is not there)."""
    from ml.contour_dose.train import dice_per_roi

    cache = Cache.open(_cache(tmp_path, 2, drop={1: ("Brainstem",)}))
    e1, e2 = cache.load("pt_1"), cache.load("pt_2")
    data = build_slices([e1, e2], PAPER_ROIS, 0.0, 500.0)
    model = _FixedContour(*e1.ct.shape[1:])
    res = validate(model, data, "contour-only", torch.device("cpu"), amp=False)
    _, a, b = data.patient_slices[0]
    pred = model(torch.zeros(b - a, 1))["contour"].argmax(1).numpy()
    own = dice_per_roi(pred, data.label[a:b].numpy(), PAPER_ROIS)["Brainstem"]
    assert 0 < own < 1
    assert res["val_dice_Brainstem"] == pytest.approx(own)  # pt_1 alone
    assert math.isnan(dice_per_roi(pred, data.label[a:b].numpy(), PAPER_ROIS, [False, True, True, True])["Brainstem"])
    # mean Dice: the mean over ROIs of each ROI's mean over its annotated patients
    per_roi = [res[f"val_dice_{n}"] for n in PAPER_ROIS]
    assert res["val_mean_dice"] == pytest.approx(np.mean(per_roi))


def _crop(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v[..., 16:56, 10:54] if v.ndim >= 3 else v) for k, v in batch.items()}  # the organs (speed)


def _fit_pixel_model(batch: dict[str, torch.Tensor], partial: bool, steps: int = 150) -> torch.nn.Module:
    """A per-pixel classifier (1x1 convolutions on the CT value) fitted with the trainer's contour
    loss on every training slice: what the loss teaches, without a U-Net's training noise."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, len(PAPER_ROIS) + 1, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        loss = task_losses({"contour": net(batch["x"])}, batch, partial_labels=partial)["contour"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def test_an_organ_annotated_in_one_of_four_patients_is_still_learned(tmp_path):
    """SpinalCord is contoured for 1 of 4 training patients. With partial labels the loss teaches
    it fully (confident on a held-out patient that has it); taught as background in the other 3
    (the old label map, ``partial_labels=False``) the model learns it is mostly *not* there."""
    from ml.contour_dose.train import dice_per_roi

    torch.set_num_threads(1)
    cache = Cache.open(_cache(tmp_path, 5, drop=dict.fromkeys((1, 2, 3), ("SpinalCord",))))
    data = build_slices([cache.load(f"pt_{i}") for i in (1, 2, 3, 4)], PAPER_ROIS, 0.0, 100.0)
    held = build_slices([cache.load("pt_5")], PAPER_ROIS, 0.0, 100.0)
    assert data.annotated[:, 1].sum() == data.patient_slices[0][2]  # pt_1's slices only
    batch = _crop(make_batch(data, torch.arange(data.n), "contour-only"))
    hb = _crop(make_batch(held, torch.arange(held.n), "contour-only"))
    cord = hb["label"] == 1 + PAPER_ROIS.index("SpinalCord")
    p_cord, dice = {}, {}
    for partial in (True, False):
        net = _fit_pixel_model(batch, partial)
        with torch.no_grad():
            probs = torch.softmax(net(hb["x"]), 1)
        p_cord[partial] = float(probs[:, 2][cord].mean())
        dice[partial] = dice_per_roi(probs.argmax(1).numpy(), hb["label"].numpy(), PAPER_ROIS)["SpinalCord"]
    assert p_cord[True] > 0.9 and dice[True] > 0.9, (p_cord, dice)
    assert p_cord[False] < 0.75 and p_cord[True] - p_cord[False] > 0.25, p_cord


# ---------------------------------------------------------------------------------------
# 2. rare and small organs
# ---------------------------------------------------------------------------------------
def test_epoch_order_draws_rare_roi_slices_at_the_requested_rate():
    n_slices, n = 1000, 800
    presence = torch.zeros(n_slices, 3, dtype=torch.bool)
    presence[:20, 0] = True  # a rare ROI: 2 % of the slices
    presence[::2, 1] = True  # a common one: 50 %
    presence[990:995, 2] = True  # another rare one, on other slices
    g = torch.Generator().manual_seed(0)
    order, source = epoch_order(presence, [0, 2], 0.2, n, g)
    assert len(order) == n
    quota = round(0.2 * n)
    for c in (0, 2):
        assert int((source == c).sum()) == quota
        assert presence[order[source == c], c].all()  # a quota slot holds its ROI
        assert presence[order, c].float().mean() >= 0.2  # the ROI is in at least the rate of the epoch
    # rare ROI: the quota plus about its natural 2 % of the uniform rest (not 2 % overall)
    assert presence[order, 0].float().mean() == pytest.approx(0.2 + 0.6 * 0.02, abs=0.02)
    uniform = order[source == -1]
    assert len(uniform) == n - 2 * quota and len(set(uniform.tolist())) == len(uniform)  # one permutation
    assert (source == 1).sum() == 0  # an unlisted ROI gets no quota
    with pytest.raises(ValueError, match="oversample_rate"):
        epoch_order(presence, [0, 1, 2], 0.5, n, g)


def test_trainer_oversamples_the_listed_rois(tmp_path):
    """Through the trainer: Brainstem is in 3 of 12 synthetic slices; asked for 50 % it fills at
    least half of every epoch; the paper's variants keep uniform sampling by default."""
    from ml.contour_dose.train import ContourDoseTask, resolved_options

    cache = Cache.open(_cache(tmp_path, 2))
    data = {"train": build_slices([cache.load("pt_1"), cache.load("pt_2")], PAPER_ROIS, 0.0, 500.0)}
    cfg = _cfg(variant="contour-only", oversample_rois=("Brainstem",), oversample_rate=0.5, steps_per_epoch=10)
    task = ContourDoseTask(cfg, build_model(model_config(cfg)), data, torch.device("cpu"))
    task.begin_epoch(0)
    assert task.batch(0)["x"].shape[0] == 4
    idx = task.order
    assert len(idx) == 10 * 4
    has_bs = (data["train"].label[idx] == 1).flatten(1).any(1).float().mean()
    natural = (data["train"].label == 1).flatten(1).any(1).float().mean()
    assert natural < 0.3 and has_bs >= 0.5
    assert resolved_options(_cfg(variant="multi-automated")) == {
        "oversample_rois": (),
        "oversample_rate": 0.0,
        "class_weights": "none",
    }
    product = resolved_options(_cfg(variant="product"))
    assert product["oversample_rois"] == RARE_ROIS and product["class_weights"] == "inv_sqrt_freq"
    assert product["oversample_rate"] * len(RARE_ROIS) <= 1
    with pytest.raises(ValueError, match="class_weights"):
        resolved_options(_cfg(class_weights="bogus"))


def test_inverse_sqrt_frequency_class_weights(tmp_path):
    from ml.contour_dose.train import class_weights

    # background 90 %, an organ 1 % of its annotated voxels, one never seen
    w = inverse_sqrt_frequency([900, 10, 0], [1000, 1000, 1000])
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(math.sqrt(0.9 / 0.01)) and w[2] == w[1]
    # on slices: a class's frequency counts only the patients annotated for it
    cache = Cache.open(_cache(tmp_path, 2, drop={1: ("Brainstem",)}))
    data = build_slices([cache.load("pt_1"), cache.load("pt_2")], PAPER_ROIS, 0.0, 500.0)
    got = class_weights(data, len(PAPER_ROIS))
    lab = data.label.long()
    f0 = float((lab == 0).float().mean())
    _, a, b = data.patient_slices[0]
    f_bs = float((lab[a:b] == 1).float().mean())  # pt_1's slices only
    assert got[1] == pytest.approx(math.sqrt(f0 / f_bs), rel=1e-6)
    assert max(got[1:]) > 5 and got[0] == pytest.approx(1.0)
    # weighted marginal CE = torch's weighted CE when every ROI is annotated
    z, y = torch.randn(2, 5, 6, 6), torch.randint(0, 5, (2, 6, 6))
    wt = torch.tensor(got, dtype=torch.float32)
    assert float(marginal_ce(z, y, torch.ones(2, 4, dtype=torch.bool), wt)) == pytest.approx(
        float(F.cross_entropy(z, y, weight=wt)), rel=1e-5
    )


def test_soft_tissue_window_channel(tmp_path):
    cache = Cache.open(_cache(tmp_path, 1))
    e = cache.load("pt_1")
    mean, std = -500.0, 450.0
    data = build_slices([e], PRODUCT_ROIS, mean, std)
    assert VARIANTS["product"]["inputs"] == ("ct3", "ct_soft", "ptv", "pdm")
    assert in_channels("product") == 6 == model_config(_cfg(variant="product")).in_channels
    assert model_config(_cfg(variant="product", soft_window=False)).in_channels == 5
    assert model_config(_cfg(variant="multi-automated")).in_channels == 1  # the paper's variants: CT only
    assert model_config(_cfg(variant="multi-automated", soft_window=True)).in_channels == 2
    x = make_batch(data, torch.arange(e.n_slices), "product")["x"]
    assert x.shape[1] == 6
    hu = e.ct.astype(np.float32)
    expected = np.clip((hu - 40.0) / 200.0, -1, 1)  # W400 / L40: [-160, 240] HU -> [-1, 1]
    np.testing.assert_allclose(x[:, 3].numpy(), expected, atol=0.01)
    assert x[:, 3].min() == -1.0 and x[:, 3].max() <= 1.0
    soft_tissue = (hu > -100) & (hu < 200)
    assert soft_tissue.any() and np.abs(x[:, 3].numpy()[soft_tissue]).max() < 1.0  # not saturated
    # an old product model (trained without the channel) keeps working from its config's inputs
    old = make_batch(data, torch.arange(2), "product", inputs=("ct3", "ptv", "pdm"))["x"]
    assert old.shape[1] == 5


# ---------------------------------------------------------------------------------------
# 3. model selection and out-of-fold Seq-Automated masks
# ---------------------------------------------------------------------------------------
def test_selection_uses_a_weighted_score_of_both_tasks_on_every_validation_patient(tmp_path):
    torch.set_num_threads(1)
    root = _cache(tmp_path / "c", 5)
    # the old cap (val_patients) is ignored: all 3 validation patients count
    m = train(root, tmp_path / "m", _cfg(epochs=3, val_patients=1), split=_split([1, 2], [3, 4, 5]), **QUIET)
    h = pd.read_csv(tmp_path / "m" / "history.csv")
    assert (h["val_patients"] == 3).all()
    expected = 0.5 * h["val_dose_score"] / 10.0 + 0.5 * (1 - h["val_mean_dice"])
    np.testing.assert_allclose(h["val_selection_score"], expected, rtol=1e-6)
    assert m["best_epoch"] == int(h["val_selection_score"].idxmin())
    assert m["best_selection_score"] == pytest.approx(h["val_selection_score"].min())
    for where in (m["selection"], json.loads((tmp_path / "m" / "config.json").read_text())["selection"]):
        assert where["metric"] == "val_selection_score" and where["val_patients"] == 3
        assert "val_dose_score / 10 Gy" in where["rule"] and "(1 - val_mean_dice)" in where["rule"]
    # a single-task model keeps its own term: dose-only selects on the dose score
    d = train(root, tmp_path / "d", _cfg(variant="dose-only", epochs=2), split=_split([1, 2], [3, 4, 5]), **QUIET)
    hd = pd.read_csv(tmp_path / "d" / "history.csv")
    np.testing.assert_allclose(hd["val_selection_score"], hd["val_dose_score"] / 10.0, rtol=1e-6)
    assert "val_mean_dice" not in d["selection"]["rule"]


def test_seq_automated_trains_on_out_of_fold_predicted_masks(tmp_path, monkeypatch):
    """Every training patient's input masks come from a contour model that did not train on it."""
    import ml.contour_dose.train as T

    torch.set_num_threads(1)
    root = _cache(tmp_path / "c", 7)
    split = _split([1, 2, 3, 4, 5], [6], [7])
    train(root, tmp_path / "contour", _cfg(variant="contour-only", epochs=1), split=split, **QUIET)
    calls: list[tuple[Path, list[str]]] = []
    real = T.predict_labels

    def spy(model_dir, entries, device):
        calls.append((Path(model_dir), [e.patient_id for e in entries]))
        return real(model_dir, entries, device)

    monkeypatch.setattr(T, "predict_labels", spy)
    out = tmp_path / "seq"
    cfg = _cfg(variant="seq-automated", epochs=1, contour_model=str(tmp_path / "contour"), oof_folds=3)
    train(root, out, cfg, split=split, **QUIET)
    train_ids = [f"pt_{i}" for i in (1, 2, 3, 4, 5)]
    predicted_by: dict[str, Path] = {}
    for model_dir, pids in calls:
        for p in pids:
            assert p not in predicted_by, f"{p} predicted twice"
            predicted_by[p] = model_dir
    assert set(predicted_by) == {*train_ids, "pt_6"}  # every train and val patient, once
    assert predicted_by["pt_6"] == out / "contour_model"  # validation: the DL-Baseline
    for p in train_ids:
        fold_cfg = json.loads((predicted_by[p] / "config.json").read_text())
        assert fold_cfg["variant"] == "contour-only"
        assert p not in fold_cfg["split"]["train"], f"{p}'s masks come from a model trained on it"
        assert set(fold_cfg["split"]["train"]) == set(train_ids) - {
            q for q in train_ids if predicted_by[q] == predicted_by[p]
        }
        assert fold_cfg["split"]["val"] == ["pt_6"]
    info = json.loads((out / "config.json").read_text())["pred_masks"]
    assert info["source"] == "out-of-fold" and info["folds"] == 3
    assert sorted(info["fold_of"]) == train_ids and set(info["fold_of"].values()) == {0, 1, 2}
    for p, f in info["fold_of"].items():
        assert predicted_by[p] == out / "oof" / f"fold_{f}"
    # the DL-Baseline's training configuration, fold by fold (tiny here)
    assert json.loads((out / "oof" / "fold_0" / "config.json").read_text())["train"]["widths"] == list(TINY)
    # rerun in the same folder with 2 folds: the old fold checkpoints hold other patients and are
    # started over, never resumed
    calls.clear()
    logs: list[str] = []
    train(root, out, _cfg(**{**cfg.__dict__, "oof_folds": 2}), split=split, log=logs.append)
    for f in (1, 2):
        fold_log = [line for line in logs if line.startswith(f"[seq-automated oof fold {f}/2]")]
        assert any("another configuration: starting over" in line for line in fold_log), fold_log
        assert not any("resumed" in line for line in fold_log)
    for model_dir, pids in calls:
        trained_on = set(json.loads((model_dir / "config.json").read_text())["split"]["train"])
        assert not trained_on & set(pids), (model_dir, pids)
    assert json.loads((out / "config.json").read_text())["pred_masks"]["folds"] == 2
    # oof_folds=0: the old in-sample masks, recorded as such
    calls.clear()
    cfg0 = _cfg(variant="seq-automated", epochs=1, contour_model=str(tmp_path / "contour"), oof_folds=0)
    train(root, tmp_path / "seq0", cfg0, split=split, **QUIET)
    assert json.loads((tmp_path / "seq0" / "config.json").read_text())["pred_masks"]["source"] == "in-sample"
