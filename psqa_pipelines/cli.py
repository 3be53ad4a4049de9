"""``psqa``: set up PSQA_HOME, run the demo, serve the UIs.

psqa init            create the PSQA_HOME layout, the Dagster instance config, the MLflow store
psqa demo            sample data -> inbox -> whole asset graph, in-process; prints where to look
                     (--qa-plans N: simulated IMRT QA programme -> BMMQA + baselines trained on CPU,
                     evaluation, Shapley report, champion alias; 0 skips the PSQA stage;
                     --no-contour-dose skips the CTAN contour + dose stage: six tiny CPU models on the
                     sample DICOM studies and the OpenKBP patients, scores, DICOM exports;
                     --no-glioma skips the GMMAS glioma stage: 8 shared lgg-mri patients, 2-fold CV of a
                     tiny CPU model, evaluation vs baselines, ablation, reports, champion alias)
psqa dev             Dagster UI (dagster dev) + MLflow UI on loopback
"""

import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from psqa_pipelines.settings import (
    PACKAGE_DIR,
    REPO_DIR,
    child_env,
    dagster_home,
    default_home,
    profile,
    team_pg_url,
    use_profile,
)


def _env(home: Path) -> Path:
    """Point this process (and its children) at ``home``; returns the Dagster home."""
    os.environ["PSQA_HOME"] = str(home)
    dagster_dir = dagster_home(home)  # DAGSTER_HOME when set, else <home>/dagster
    os.environ["DAGSTER_HOME"] = str(dagster_dir)
    return dagster_dir


def init(home: Path) -> None:
    from psqa_pipelines.resources import MlflowResource, PsqaStorage

    dagster_dir = _env(home)
    storage = PsqaStorage(home=str(home))
    storage.ensure_dirs()
    dagster_dir.mkdir(parents=True, exist_ok=True)
    cfg = dagster_dir / "dagster.yaml"
    text = instance_config()
    # local: the packaged file, copied once (a user may edit it); team/cluster: generated from the
    # settings every time (change PSQA_PG_URL, not the file)
    old = cfg.read_text() if cfg.exists() else None
    if old is None or _profile_marker(old) != _profile_marker(text) or (profile() != "local" and old != text):
        if old is not None:
            print(f"{cfg}: rewritten for PSQA_PROFILE={profile()}")
        cfg.write_text(text)
    MlflowResource().ensure_store()


def _profile_marker(text: str) -> str:
    return next((line for line in text.splitlines() if line.startswith("# psqa profile:")), "# psqa profile: local")


def instance_config() -> str:
    """The Dagster instance config for the current profile: the packaged ``dagster.yaml`` (SQLite
    under ``DAGSTER_HOME``), plus, in the team and cluster profiles, run/event/schedule storage on
    PostgreSQL (database ``dagster`` of ``PSQA_PG_URL``)."""
    text = (PACKAGE_DIR / "instance" / "dagster.yaml").read_text()
    p = profile()
    if p == "local":
        return text
    # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed
    url = f"{team_pg_url()}/dagster".replace("postgresql://", "postgresql+psycopg2://", 1)
    return (
        f"# psqa profile: {p}\n"
        + text
        + "\n# runs, events and schedules on PostgreSQL (dagster-postgres); written by `psqa init` for "
        f'PSQA_PROFILE={p}\nstorage:\n  postgres:\n    postgres_url: "{url}"\n'
    )


DEMO_TRAINING = {
    "epochs": 6,
    "batch_size": 16,
    "patience": 50,
    "warmup_epochs": 2,
    "enc_widths": [8, 16, 32, 32],
    "dec_widths": [8, 8, 8, 8],
}


DEMO_CONTOUR_DOSE = {
    "epochs": 2,
    "steps_per_epoch": 6,
    "batch_size": 8,
    "widths": [8, 16, 32, 64, 128],
    "oof_folds": 2,  # Seq-Automated's out-of-fold contours from 2 (not 3) tiny contour models: a pipeline check
}


DEMO_GLIOMA_TRAINING = {
    "epochs": 2,
    "batch_size": 8,
    "widths": [4, 8, 8, 16],
    "pseudo_labels": False,
    "distill": False,
}
DEMO_GLIOMA_PATIENTS = 8


def demo_glioma_config(lgg_dir: Path) -> dict:
    """Run config of ``glioma_job`` for the demo: a few lgg-mri patients, 2 folds, a tiny model."""
    return {
        "ops": {
            "glioma_import": {
                "config": {"lgg_dir": str(lgg_dir), "brain_mri_dir": "", "max_patients": DEMO_GLIOMA_PATIENTS}
            },
            "glioma_folds": {"config": {"n_folds": 2}},
            "glioma_model": {"config": DEMO_GLIOMA_TRAINING},
            "glioma_cv_predictions": {"config": {**DEMO_GLIOMA_TRAINING, "mc": 2}},
            "glioma_evaluation": {"config": {"n_boot": 200}},
            "glioma_ablation": {"config": {"variants": ["equal_weights"], "folds": [0], "n_boot": 100}},
        }
    }


def _demo_glioma(defs, instance, lgg_dir: Path, level: str = "INFO") -> bool:
    print(f"glioma (GMMAS): {DEMO_GLIOMA_PATIENTS} lgg-mri patients, 2-fold CV of a tiny CPU model, evaluation, ...")
    from psqa_pipelines.runner import execute_in_location

    res = execute_in_location(
        defs, "glioma_job", instance, demo_glioma_config(lgg_dir), console_level=level, raise_on_error=False
    )
    if res.success:
        ev = res.output_for_node("glioma_evaluation")
        print(
            ev[["model", "task", "n", "auc_ci", "balanced_accuracy"]].to_string(
                index=False, float_format="{:.2f}".format
            )
        )
        oof = res.output_for_node("glioma_cv_predictions")
        champ = res.output_for_node("glioma_challenger_eval").iloc[0]
        print(
            f"out-of-fold Dice {oof['dice'].mean():.2f} over {len(oof)} patients; champion alias: {champ['reason']}\n"
            "(pipeline check on 8 patients and 2 epochs: these numbers say nothing about GMMAS. Real numbers: "
            "benchmarks/glioma.py and the README's glioma section.)"
        )
    return res.success


def _demo_defs(home: str):
    """The demo's Definitions (rebuilt in each ingestion worker process): shared OpenKBP source off,
    no settle time (the demo's files are complete when it scans)."""
    from psqa_pipelines.definitions import build_defs, build_resources
    from psqa_pipelines.resources import PsqaStorage

    return build_defs(build_resources(PsqaStorage(home=home, openkbp_dir="", inbox_settle_seconds=0)))


class _StageClock:
    """Wall time per demo stage: ``start(name)`` ends the running stage and starts ``name``."""

    def __init__(self, stages: dict[str, float]):
        self.stages = stages
        self.name: str | None = None
        self.t = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self.name, self.t = name, time.perf_counter()

    def stop(self) -> None:
        if self.name is not None:
            self.stages[self.name] = self.stages.get(self.name, 0.0) + time.perf_counter() - self.t
            self.name = None


def demo(
    home: Path,
    studies: int,
    with_shared: bool,
    qa_plans: int = 60,
    contour_dose: bool = True,
    glioma: bool = True,
    verbose: bool = False,
    workers: int = 2,
) -> int:
    import dagster as dg

    from ml.data.synthetic import generate_hn_cohort
    from psqa_pipelines.resources import PsqaStorage
    from psqa_pipelines.runner import execute_in_location, run_inbox_cycle

    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    stage = _StageClock(stages)
    level = "DEBUG" if verbose else "INFO"
    stage.start("setup")
    init(home)
    storage = PsqaStorage(home=str(home), openkbp_dir="", inbox_settle_seconds=0)
    sample_dir = storage.inbox / "sample_hn"
    if not sample_dir.exists():
        stage.start("sample data")
        print(f"generating {studies} head-and-neck DICOM studies (CT + RTSTRUCT + RTDOSE, planted PHI) ...")
        generate_hn_cohort(sample_dir, studies, seed=0)
    stage.start("setup")
    shared = REPO_DIR.parent / "shared" / "datasets"
    if with_shared and shared.is_dir():
        for src, dst in (
            (shared / "brain-mri-samples" / "brats2023-layout" / "BraTS-GLI-00001-000", "brats/BraTS-GLI-00001-000"),
            (shared / "openkbp" / "train-pats" / "pt_1", "openkbp/pt_1"),
            (shared / "openkbp" / "train-pats" / "pt_10", "openkbp/pt_10"),
        ):
            if src.is_dir() and not (storage.inbox / dst).exists():
                shutil.copytree(src, storage.inbox / dst)
    qa_dir = storage.inbox / "qa_programme"
    if qa_plans > 0 and not qa_dir.exists():
        from tqdm import tqdm

        from ml.psqa.simulator import simulate

        stage.start("QA simulation")
        print(f"simulating an IMRT QA programme: {qa_plans} plans (RT Plan, planned + measured RT Dose, QA CSV) ...")
        with tqdm(total=qa_plans, desc="QA plans", unit="plan") as bar:
            simulate(qa_dir, qa_plans, seed=0, progress=lambda done, total: bar.update(done - bar.n))
    stage.start("setup")
    defs = _demo_defs(str(home))
    train_ok = True
    with dg.DagsterInstance.get() as instance:
        stage.start("ingestion")
        report = run_inbox_cycle(
            defs,
            instance,
            progress=not verbose,
            console_level=level,
            workers=workers,
            defs_factory=functools.partial(_demo_defs, str(home)),
        )
        if qa_plans > 0:
            from psqa_pipelines.defs.psqa.training import training_assets

            stage.start("PSQA training")
            print("training BMMQA and its baselines (small CPU configuration), evaluating, promoting ...")
            run_config = {"ops": {a.key.to_user_string(): {"config": DEMO_TRAINING} for a in training_assets}}
            res = execute_in_location(
                defs, "train_psqa", instance, run_config, console_level=level, raise_on_error=False
            )
            train_ok = res.success
            if res.success:
                ev = res.output_for_node("psqa_evaluation")
                cols = [
                    c
                    for c in (
                        "model",
                        "MAE 2%/3mm",
                        "MAE 2%/2mm",
                        "MAE GPR<90 (2%/2mm)",
                        "AUC fail (2%/2mm)",
                        "DD SSIM mean",
                    )
                    if c in ev.columns
                ]
                print(ev[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
                print(
                    f"(pipeline check: {qa_plans} simulated plans and a few CPU epochs; these MAEs say nothing about "
                    "BMMQA against its baselines, which a short run need not beat. Real numbers: README, PSQA "
                    "section, and benchmarks/psqa_ablation.py.)"
                )
        if contour_dose:
            from psqa_pipelines.defs.contour_dose.training import training_assets as cd_assets

            stage.start("contour + dose training")
            print("training the contour + dose family (tiny CPU models), evaluating, exporting DICOM ...")
            run_config = {"ops": {a.key.to_user_string(): {"config": DEMO_CONTOUR_DOSE} for a in cd_assets}}
            res = execute_in_location(
                defs, "train_contour_dose", instance, run_config, console_level=level, raise_on_error=False
            )
            train_ok = train_ok and res.success
            if res.success:
                ev = res.output_for_node("contour_dose_evaluation")
                cols = [c for c in ("model", "dose_score", "dvh_score", "mean_dice") if c in ev.columns]
                print(ev[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
                print(
                    "(pipeline check: 96 training slices per model on a handful of patients; these scores say "
                    "nothing about the models. Real numbers: README, contour + dose section.)"
                )
        lgg_dir = shared / "lgg-mri"
        if glioma and with_shared and (lgg_dir / "patients").is_dir():
            stage.start("glioma")
            train_ok = _demo_glioma(defs, instance, lgg_dir, level) and train_ok
        elif glioma:
            print(f"glioma stage skipped: {lgg_dir} is absent" if with_shared else "glioma stage skipped (--no-shared)")
    stage.stop()
    elapsed = time.perf_counter() - t0
    print()
    print(
        f"demo finished in {elapsed:.0f} s: {len(report.studies)} studies ingested, {len(report.failed)} failed; "
        f"files seen {report.files_seen} = ingested {report.files_ingested} + quarantined {report.files_quarantined}"
    )
    print("  where the time went: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    print(f"  PSQA_HOME      {home}")
    print(f"  Parquet tables {storage.tables}")
    print(f"  volumes        {storage.lake / 'volumes'}")
    print(f"  quarantine     {storage.quarantine}")
    print(f"  MLflow store   {home / 'mlflow' / 'mlflow.db'}")
    print(
        "next: `make dev`, then open the Dagster UI at http://127.0.0.1:3000 (asset groups ingest -> "
        "preprocess -> lake_tables -> psqa -> psqa_training -> contour_dose -> contour_dose_training -> glioma) and "
        "MLflow at http://127.0.0.1:5000 (models psqa-bmmqa and glioma-gmmas with alias champion, "
        "contour-dose-<variant>)"
    )
    tables_ok = all(r.success for r in report.results)  # the lake-wide table runs (this process)
    if not tables_ok:
        print("a lake-wide table run failed: see its run in the Dagster UI")
    return 0 if not report.failed and train_ok and tables_ok else 1


def dev(home: Path, dagster_port: int, mlflow_port: int) -> int:
    init(home)
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    mlflow_cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "--default-artifact-root",
        (home / "mlflow" / "artifacts").as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(mlflow_port),
        "--workers",
        "1",
    ]
    dagster_cmd = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(REPO_DIR / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(dagster_port),
    ]
    procs = [subprocess.Popen(dagster_cmd, env=env, cwd=REPO_DIR, start_new_session=True)]
    if profile() == "local":
        procs.append(subprocess.Popen(mlflow_cmd, env=env, start_new_session=True))
        mlflow_ui = f"http://127.0.0.1:{mlflow_port}"
    else:  # the team's tracking server (`psqa team up`) is the MLflow UI
        from psqa_pipelines.settings import team_mlflow_url

        mlflow_ui = team_mlflow_url()
    print(
        f"Dagster UI: http://127.0.0.1:{dagster_port}   MLflow UI: {mlflow_ui}   (Ctrl-C stops "
        + ("both)" if len(procs) == 2 else "Dagster; `psqa team down` stops the team services)")
    )
    from psqa_pipelines.resources import PsqaStorage

    print(_dev_activity(PsqaStorage(home=str(home))))

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        # each server runs in its own process group: stop the whole group (dagster dev's
        # code server, webserver and daemon do not all exit when only their parent does)
        for p in procs:
            _signal_group(p.pid, signal.SIGINT)
        deadline = time.time() + 20
        for p in procs:
            try:
                p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            _signal_group(p.pid, signal.SIGKILL)
    return 0


def _dev_activity(storage) -> str:
    """What `make dev` will do on its own: the sensors that start running and what they watch."""
    kbp = storage.openkbp
    sources = f"{storage.inbox}" + (
        f" and the OpenKBP folder {kbp} (one ingestion run per new patient)"
        if kbp is not None
        else " (the OpenKBP source is off: PSQA_OPENKBP_DIR=shared or a folder opts in)"
    )
    return (
        f"running by default: inbox_sensor (every 30 s: new studies in {sources}) and lake_automation "
        "(rebuilds lake-wide tables after studies land); the retraining schedules are stopped until you "
        "start them in the UI"
    )


def team(home: Path, action: str) -> int:
    """``psqa team up|down|status`` (``make team-up`` / ``make team-down``): see ``psqa_pipelines.team``.
    ``up`` also initialises ``PSQA_HOME`` for the team profile (instance on PostgreSQL, the MLflow
    experiment on the server)."""
    import json

    from psqa_pipelines.team import TeamServiceError, TeamServices

    _env(home)
    services = TeamServices(home)
    try:
        if action == "up":
            if profile() == "local":
                use_profile("team")  # `psqa team up` means the team profile
            state = services.up()
            init(home)
            print(json.dumps(state, indent=2))
            print(
                "team services up. In every shell that runs Dagster or the pipelines: export PSQA_PROFILE=team "
                f"PSQA_HOME={home}; then `make dev` (Dagster UI; MLflow UI at {state['mlflow']['url']})"
            )
        elif action == "down":
            services.down()
            print("team services stopped")
        else:
            state = services.status()
            print(json.dumps(state, indent=2))
            return 0 if all(s["healthy"] for s in state.values()) else 1
    except TeamServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="psqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, default=None, help="PSQA_HOME (default: $PSQA_HOME or <checkout>/.psqa)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init")
    d = sub.add_parser("demo")
    d.add_argument("--studies", type=int, default=3)
    d.add_argument("--no-shared", action="store_true", help="do not copy ../shared samples (BraTS, 2 OpenKBP patients)")
    d.add_argument("--qa-plans", type=int, default=60, help="simulated QA plans for the PSQA stage (0: skip it)")
    d.add_argument("--no-contour-dose", action="store_true", help="skip the contour + dose training stage")
    d.add_argument("--no-glioma", action="store_true", help="skip the GMMAS glioma stage (needs ../shared lgg-mri)")
    d.add_argument(
        "--verbose", action="store_true", help="Dagster's full event stream on the console (always in the event log)"
    )
    d.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="ingestion runs executed at once, each in its own process (default: 2, or 1 on one core)",
    )
    t = sub.add_parser("team", help="one-machine rehearsal of the team deployment (PostgreSQL + MLflow server)")
    t.add_argument("action", choices=["up", "down", "status"])
    v = sub.add_parser("dev")
    v.add_argument("--dagster-port", type=int, default=3000)
    v.add_argument("--mlflow-port", type=int, default=5000)
    args = parser.parse_args(argv)
    home = (args.home or default_home()).resolve()
    if args.cmd == "init":
        init(home)
        print(f"initialised {home}")
        return 0
    if args.cmd == "team":
        return team(home, args.action)
    if args.cmd == "demo":
        return demo(
            home,
            args.studies,
            not args.no_shared,
            args.qa_plans,
            not args.no_contour_dose,
            not args.no_glioma,
            verbose=args.verbose,
            workers=args.workers,
        )
    return dev(home, args.dagster_port, args.mlflow_port)


if __name__ == "__main__":
    raise SystemExit(main())
