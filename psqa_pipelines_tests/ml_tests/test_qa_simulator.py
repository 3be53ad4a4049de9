"""Tests of the IMRT QA digital twin (ml.psqa.simulator)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ml.metrics.gamma import gamma_pass_rates
from ml.psqa import simulator as S
from ml.psqa.dose_model import DoseModel
from ml.psqa.plan import Plan, read_plan
from ml.psqa.rt_writers import QA_CSV_COLUMNS
from ml.psqa.sequencing import MLC_BOUNDARIES_MM, beam_from_levels, sweep_sequence

SEED = 11
N_PLANS = 4


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch0(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("qa_b0")
    return out, S.simulate(out, N_PLANS, seed=SEED, batch=0, workers=1)


@pytest.fixture(scope="module")
def qa_rows(batch0) -> list[dict]:
    out, _ = batch0
    with open(out / "qa_results" / S.csv_name(0)) as f:
        return list(csv.DictReader(f))


def _plan_files(out: Path, summary: dict) -> tuple[Path, list[Path]]:
    folder = out / summary["plan_folder"]
    rp = sorted(folder.glob("RP*.dcm"))
    assert len(rp) == 1
    return rp[0], sorted(folder.glob("RD_*.dcm"))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _gpr(planned: dict, measured: dict, criteria=((2, 2),)) -> dict:
    p = np.sum(list(planned.values()), axis=0).astype(np.float32)
    m = np.sum(list(measured.values()), axis=0).astype(np.float32)
    return gamma_pass_rates(m, p, 2.0, criteria=criteria, lower_cutoff_percent=10.0)


def _high_dd(planned: dict, measured: dict) -> float:
    """Mean (measured - planned) over the composite's >= 50 % region, % of the planned maximum."""
    p = np.sum(list(planned.values()), axis=0)
    m = np.sum(list(measured.values()), axis=0)
    high = p >= 0.5 * p.max()
    return float((m[high] - p[high]).mean() / p.max() * 100.0)


# -- files -------------------------------------------------------------------------------------------
def test_layout_and_csv(batch0, qa_rows):
    out, summary = batch0
    assert len(summary) == N_PLANS
    top = {p.name for p in out.iterdir()}
    assert "qa_results" in top
    assert {s["patient_folder"] for s in summary} == top - {"qa_results"}
    # nothing but DICOM in the plan folders and the QA export in qa_results: no truth in the inbox
    for p in _files(out):
        assert p.suffix in (".dcm", ".csv"), p
        assert not p.name.startswith(".")  # no temporary files left behind
    assert [p.name for p in (out / "qa_results").iterdir()] == [S.csv_name(0)]
    with open(out / "qa_results" / S.csv_name(0)) as f:
        header = f.readline().strip().split(",")
    assert tuple(header) == QA_CSV_COLUMNS
    text = (out / "qa_results" / S.csv_name(0)).read_text()
    for word in ("fault", "stuck", "LINAC_", "bank"):
        assert word not in text
    # composite + every beam, three criteria each, one decimal
    for s in summary:
        rows = [r for r in qa_rows if r["PlanSOPInstanceUID"] == s["plan_uid"]]
        assert len(rows) == 3 * (s["n_beams"] + 1)
        assert {r["BeamNumber"] for r in rows} == {"ALL", *(str(b) for b in range(1, s["n_beams"] + 1))}
        assert {r["Criterion"] for r in rows} == {"3%/3mm", "3%/2mm", "2%/2mm"}
        for r in rows:
            assert r["GPR"] == f"{float(r['GPR']):.1f}" and 0.0 <= float(r["GPR"]) <= 100.0
            assert r["PatientID"] == s["patient_id"] and r["PlanLabel"] == s["label"]
        comp = {r["Criterion"]: float(r["GPR"]) for r in rows if r["BeamNumber"] == "ALL"}
        assert abs(comp["2%/2mm"] - s["gpr_2_2"]) <= 0.051
        assert comp["3%/3mm"] >= comp["3%/2mm"] >= comp["2%/2mm"]


def test_valid_dicom_and_plan(batch0):
    out, summary = batch0
    for s in summary:
        rp_path, rd_paths = _plan_files(out, s)
        rp = pydicom.dcmread(rp_path)
        assert rp.Modality == "RTPLAN" and rp.SOPInstanceUID == s["plan_uid"]
        plan = read_plan(rp)
        assert len(plan.beams) == s["n_beams"] and 5 <= len(plan.beams) <= 9
        assert plan.total_mu == pytest.approx(s["total_mu"], abs=0.01)
        assert plan.prescription_gy == s["prescription_gy"] and plan.fractions == s["fractions"]
        gantries = sorted(b.control_points[0].gantry_angle for b in plan.beams)
        steps = np.diff(gantries)
        assert np.allclose(steps, 360.0 / len(plan.beams), atol=0.11)  # equispaced
        for b in plan.beams:
            assert b.delivery in ("STEP_AND_SHOOT", "STATIC")
            assert 25.0 <= b.meterset_mu <= 500.0
            assert np.array_equal(b.leaf_boundaries, MLC_BOUNDARIES_MM)
            assert b.control_points[-1].cumulative_meterset_weight == pytest.approx(1.0)
        assert sum(len(b.apertures()) for b in plan.beams) == s["n_segments"]
        kinds = {}
        for p in rd_paths:
            ds = pydicom.dcmread(p)
            assert ds.Modality == "RTDOSE" and ds.StudyInstanceUID == rp.StudyInstanceUID
            ref = ds.ReferencedRTPlanSequence[0]
            assert ref.ReferencedSOPInstanceUID == s["plan_uid"]
            beam = None
            if "ReferencedFractionGroupSequence" in ref:
                beam = int(ref.ReferencedFractionGroupSequence[0].ReferencedBeamSequence[0].ReferencedBeamNumber)
            kinds[p.name] = (ds.DoseSummationType, beam)
            assert ds.pixel_array.shape == (128, 128) and float(ds.PixelSpacing[0]) == 2.0
        n = s["n_beams"]
        expected = {f"RD_planned_beam{b}.dcm": ("BEAM", b) for b in range(1, n + 1)}
        expected |= {f"RD_measured_beam{b}.dcm": ("RECORD", b) for b in range(1, n + 1)}
        expected |= {"RD_planned_plan.dcm": ("PLAN", None), "RD_measured_plan.dcm": ("RECORD", None)}
        assert kinds == expected


def test_plan_carries_treatment_machine_and_qa_device_identity(batch0):
    """Every beam of the RT Plan names its treatment machine (as real plans do); the QA planes carry
    the device; ``compute_plan_qa`` returns both as the plan's machine identity."""
    from ml.psqa.pack import compute_plan_qa

    out, summary = batch0
    devices = {lin.name: lin.device for lin in S.LINACS}
    for s in summary:
        rp_path, rd_paths = _plan_files(out, s)
        rp = pydicom.dcmread(rp_path)
        assert [b.TreatmentMachineName for b in rp.BeamSequence] == [s["linac"]] * s["n_beams"]
        qa = compute_plan_qa(rp, [pydicom.dcmread(p) for p in rd_paths])
        assert qa.machine == {"treatment_machine": s["linac"], "qa_device": devices[s["linac"]]}


def test_composites_are_beam_sums(batch0):
    out, summary = batch0
    s = summary[0]
    folder = out / s["plan_folder"]

    def gy(name: str) -> np.ndarray:
        ds = pydicom.dcmread(folder / name)
        return ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)

    for kind in ("planned", "measured"):
        beams = sum(gy(f"RD_{kind}_beam{b}.dcm") for b in range(1, s["n_beams"] + 1))
        comp = gy(f"RD_{kind}_plan.dcm")
        assert np.abs(comp - beams).max() <= s["n_beams"] * 1e-6
        assert comp.max() > 0.5  # a fraction's worth of dose (Gy)


def test_pack_reproduces_csv(batch0, qa_rows):
    from ml.psqa.pack import compute_plan_qa

    out, summary = batch0
    for s in summary[:2]:
        rp_path, rd_paths = _plan_files(out, s)
        qa = compute_plan_qa(pydicom.dcmread(rp_path), [pydicom.dcmread(p) for p in rd_paths])
        rows = [r for r in qa_rows if r["PlanSOPInstanceUID"] == s["plan_uid"]]
        for r in rows:
            got = (
                qa.gpr[r["Criterion"]]
                if r["BeamNumber"] == "ALL"
                else qa.beam_gpr[int(r["BeamNumber"])][r["Criterion"]]
            )
            assert abs(got - float(r["GPR"])) <= 0.1, (r, got)
        assert qa.n_beams == s["n_beams"]


def test_phi_planted(batch0, qa_rows):
    out, summary = batch0
    s = summary[0]
    phi = S._phi(SEED, 0, int(s["patient_id"][-5:]))
    assert phi.patient_id == s["patient_id"]
    rp_path, rd_paths = _plan_files(out, s)
    for path in (rp_path, rd_paths[0]):
        raw = path.read_bytes()
        for value in (
            phi.patient_name,
            phi.patient_id,
            phi.birth_date,
            phi.institution_name,
            phi.accession_number,
            phi.patient_address,
            phi.referring_physician,
            phi.other_patient_id,
        ):
            assert value.encode() in raw, value
        ds = pydicom.dcmread(path)
        assert str(ds.PatientName) == phi.patient_name and ds.PatientBirthDate == phi.birth_date
    assert phi.family_name in s["patient_folder"]  # exports name folders after the patient
    assert any(r["PatientName"] == phi.patient_name for r in qa_rows)


def test_deterministic_and_worker_independent(batch0, tmp_path):
    out, summary = batch0
    seen = []
    again = S.simulate(tmp_path, N_PLANS, seed=SEED, batch=0, workers=2, progress=lambda d, n: seen.append((d, n)))
    assert again == summary
    assert seen == [(i + 1, N_PLANS) for i in range(N_PLANS)]  # one progress call per plan, in order
    a, b = _files(out), _files(tmp_path)
    assert [p.relative_to(out) for p in a] == [p.relative_to(tmp_path) for p in b]
    for p, q in zip(a, b, strict=True):
        assert p.read_bytes() == q.read_bytes(), p


def test_chunks_match_whole_batch(batch0, tmp_path):
    _, summary = batch0
    part = S.simulate(tmp_path, 2, seed=SEED, batch=0, start_index=2, workers=1, write=False)
    assert part == summary[2:4]
    assert S.csv_name(0, 2) != S.csv_name(0)


def test_second_batch_is_new(batch0, tmp_path):
    out, summary = batch0
    b1 = S.simulate(tmp_path, 3, seed=SEED, batch=1, workers=1)
    assert not {s["patient_id"] for s in b1} & {s["patient_id"] for s in summary}
    assert not {s["plan_uid"] for s in b1} & {s["plan_uid"] for s in summary}
    assert (tmp_path / "qa_results" / S.csv_name(1)).is_file()

    def uids(root: Path) -> set[str]:
        found = set()
        for p in root.rglob("*.dcm"):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            found |= {ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID}
        return found

    assert not uids(tmp_path) & uids(out)


# -- physics ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plan():
    p, _ = S.draw_plan(S._rng(3, 0, 1, "plan"))
    return p


def test_perfect_machine_passes(plan):
    planned, measured = S.plan_planes(plan, S.perfect_state(plan), np.random.default_rng(0), S.NOISELESS)
    for n in planned:
        assert np.allclose(planned[n], measured[n], atol=1e-9)
    assert _gpr(planned, measured)["2%/2mm"] == 100.0


def test_leaf_gap_error_increases_dd(plan):
    """Opening both banks (a leaf-gap error) raises the delivered dose monotonically."""
    base = S.perfect_state(plan)
    dds, gprs = [], []
    for gap in (0.0, 0.4, 0.8, 1.6):
        st = replace(base, bank_a_mm=-gap / 2, bank_b_mm=gap / 2)
        planned, measured = S.plan_planes(plan, st, np.random.default_rng(0), S.NOISELESS)
        dds.append(_high_dd(planned, measured))
        gprs.append(_gpr(planned, measured)["2%/2mm"])
    assert dds[0] == pytest.approx(0.0, abs=1e-9)
    assert all(b > a for a, b in zip(dds, dds[1:], strict=False))
    assert dds[-1] > 2.0
    assert gprs[-1] < gprs[0]


def test_narrow_segments_suffer_more():
    """The same leaf-gap error costs a finely modulated beam more than an open one (no complexity
    table involved: the segments' widths do it)."""
    edges = np.arange(-40.0, 40.01, 5.0)
    rows = (MLC_BOUNDARIES_MM[:-1] >= -40) & (MLC_BOUNDARIES_MM[1:] <= 40)
    flat = np.zeros((60, 16), int)
    flat[rows] = 4
    stripes = np.zeros((60, 16), int)
    stripes[rows] = np.tile([1, 4, 2, 4, 1, 3, 4, 1, 2, 4, 1, 4, 3, 1, 4, 2], (int(rows.sum()), 1))

    def rel_dd(levels: np.ndarray) -> float:
        beam = beam_from_levels(sweep_sequence(levels, edges), number=1, name="T", mu_per_level=20.0, gantry_angle=0.0)
        p = Plan(label="T", beams=[beam])
        st = replace(S.perfect_state(p), bank_a_mm=-0.25, bank_b_mm=0.25)
        planned, measured = S.plan_planes(p, st, np.random.default_rng(0), S.NOISELESS)
        pl, me = planned[1], measured[1]
        core = pl >= 0.5 * pl.max()
        return float(np.mean((me[core] - pl[core]) / pl[core]))

    assert rel_dd(stripes) > 2.0 * rel_dd(flat) > 0


def test_tongue_and_groove_only_on_the_machine(plan):
    st = replace(S.perfect_state(plan), model=replace(DoseModel(), tg_width_mm=0.3))
    planned, measured = S.plan_planes(plan, st, np.random.default_rng(0), S.NOISELESS)
    assert _high_dd(planned, measured) < -0.1  # T&G shadows strips: the machine delivers less


@pytest.mark.parametrize("kind", ["mu_calibration", "stuck_leaf"])
def test_faults_fail_more_than_clean(plan, kind):
    zero = dict(p_stuck_leaf=0.0, p_bank_offset=0.0, p_mu_calibration=0.0)
    clean = S.machine_state(np.random.default_rng(5), plan, S.SimConfig(**zero))
    faulty = S.machine_state(np.random.default_rng(5), plan, S.SimConfig(**{**zero, f"p_{kind}": 1.0}))
    assert clean.fault == "" and faulty.fault == kind
    res = {}
    for name, st in (("clean", clean), ("fault", faulty)):
        planned, measured = S.plan_planes(plan, st, np.random.default_rng(1))
        res[name] = (_gpr(planned, measured)["2%/2mm"], abs(_high_dd(planned, measured)))
    assert res["fault"][0] < res["clean"][0] - 3.0
    assert res["fault"][1] > res["clean"][1]


def test_machine_state_does_not_read_complexity(plan):
    """The day's machine state comes from the rng alone: a plan of open fields with the same number
    of beams gets exactly the same errors (the plan only sets array sizes)."""
    edges = np.arange(-50.0, 50.01, 5.0)
    levels = np.zeros((60, 20), int)
    levels[20:40] = 1
    open_beams = [
        beam_from_levels(
            sweep_sequence(levels, edges), number=i + 1, name=f"B{i}", mu_per_level=100.0, gantry_angle=0.0
        )
        for i in range(len(plan.beams))
    ]
    simple = Plan(label="OPEN", beams=open_beams)
    cfg = S.SimConfig(p_stuck_leaf=0.0, p_bank_offset=0.0, p_mu_calibration=0.0)
    a = S.machine_state(np.random.default_rng(9), plan, cfg)
    b = S.machine_state(np.random.default_rng(9), simple, cfg)
    assert a.model == b.model and a.output == b.output and a.linac == b.linac
    assert (a.bank_a_mm, a.bank_b_mm, a.noise_rel) == (b.bank_a_mm, b.bank_b_mm, b.noise_rel)
    for f in ("leaf_a_mm", "leaf_b_mm", "beam_output", "setup_mm"):
        assert np.array_equal(getattr(a, f), getattr(b, f))


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli(tmp_path, capsys):
    from ml.cli import main

    truth = tmp_path / "truth" / "t.csv"
    assert (
        main(
            [
                "psqa",
                "simulate",
                "--out",
                str(tmp_path / "inbox"),
                "--plans",
                "1",
                "--seed",
                "4",
                "--batch",
                "2",
                "--workers",
                "1",
                "--truth",
                str(truth),
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["plans"] == 1 and info["files"] == len(_files(tmp_path / "inbox"))
    assert (tmp_path / "inbox" / "qa_results" / S.csv_name(2)).is_file()
    with open(truth) as f:
        assert next(csv.DictReader(f))["fault"] in ("none", "stuck_leaf", "bank_offset", "mu_calibration")
    with pytest.raises(SystemExit):
        main(
            [
                "psqa",
                "simulate",
                "--out",
                str(tmp_path / "inbox"),
                "--plans",
                "1",
                "--truth",
                str(tmp_path / "inbox" / "t.csv"),
            ]
        )


# -- statistics (slow) ------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpr_distribution_is_clinical(tmp_path):
    from scipy.stats import spearmanr

    from ml.psqa.complexity import plan_metrics

    res = S.simulate(tmp_path, 40, seed=21, write=False)
    g22 = np.array([r["gpr_2_2"] for r in res])
    g33 = np.array([r["gpr_3_3"] for r in res])
    assert 93.0 <= np.median(g22) <= 99.5
    assert np.mean(g22 < 90.0) <= 0.3
    assert np.median(g33) >= 98.0
    mcs = [plan_metrics(S.draw_plan(S._rng(21, 0, r["index"], "plan"))[0])["mcs"] for r in res]
    assert spearmanr(g22, mcs)[0] > 0.0  # less complex (higher MCS) -> higher GPR
