"""``psqa_pipelines.settings`` is the only reader of the environment in the Dagster layer, and
its settings keep their documented defaults."""

from __future__ import annotations

import ast
from pathlib import Path

from psqa_pipelines_tests.conftest import REPO

PACKAGE = REPO / "psqa_pipelines"


def _environment_reads(source: str, label: str) -> list[str]:
    """Every place ``path`` reads the environment: ``os.environ`` in any use other than the target
    of an item assignment (``os.environ[k] = v`` for child processes is a write),
    ``os.getenv``/``os.getenvb``, ``from os import environ/getenv`` and Dagster's ``EnvVar``
    (resolved from the environment when the resource is built)."""
    tree = ast.parse(source, filename=label)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        where = f"{label}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [
                f"{where} from os import {a.name}"
                for a in node.names
                if a.name in {"environ", "environb", "getenv", "getenvb"}
            ]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            if node.attr in {"getenv", "getenvb"}:
                found.append(f"{where} os.{node.attr}")
            elif node.attr in {"environ", "environb"}:
                parent = parents.get(node)
                written = (
                    isinstance(parent, ast.Subscript) and parent.value is node and isinstance(parent.ctx, ast.Store)
                )
                if not written:
                    found.append(f"{where} os.{node.attr} (read)")
        elif getattr(node, "attr", None) == "EnvVar" or getattr(node, "id", None) == "EnvVar":
            found.append(f"{where} EnvVar")
    return found


def test_only_settings_reads_the_environment():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20  # the walk found the package
    offenders = [
        hit
        for path in modules
        if path != PACKAGE / "settings.py"
        for hit in _environment_reads(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not offenders, "read the environment through psqa_pipelines.settings:\n" + "\n".join(offenders)


def test_the_check_tells_reads_from_writes():
    assert _environment_reads((PACKAGE / "settings.py").read_text(), "settings.py")  # it does read
    assert _environment_reads("import os\nos.environ['A'] = '1'\n", "write") == []
    for code in (
        "import os\nx = os.environ.get('A')\n",
        "import os\nx = os.environ['A']\n",
        "import os\nx = dict(os.environ)\n",
        "import os\nos.environ.setdefault('A', '1')\n",
        "import os\nx = os.getenv('A')\n",
        "from os import environ\n",
        "import dagster as dg\nx = dg.EnvVar('A')\n",
    ):
        assert _environment_reads(code, "probe"), code


def test_documented_defaults(monkeypatch):
    from psqa_pipelines import settings

    for s in settings.ENV_SETTINGS:
        monkeypatch.delenv(s.name, raising=False)
    assert settings.retrain_cron() == "0 2 * * 1"
    assert settings.retrain_min_new_plans() == 20
    assert settings.deid_secret_config() == ""
    assert settings.mlflow_tracking_uri() == f"sqlite:///{settings.default_home() / 'mlflow' / 'mlflow.db'}"
    assert settings.storage_dir_override("lake") is None
    assert settings.dagster_home(Path("/x")) == Path("/x/dagster")

    monkeypatch.setenv("PSQA_RETRAIN_CRON", "0 3 * * *")
    monkeypatch.setenv("PSQA_RETRAIN_MIN_NEW_PLANS", "7")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("PSQA_LAKE_DIR", "/data/lake")
    monkeypatch.setenv("PSQA_DEID_SECRET", "s3cret")
    assert settings.retrain_cron() == "0 3 * * *"
    assert settings.retrain_min_new_plans() == 7
    assert settings.mlflow_tracking_uri() == "http://mlflow:5000"
    assert settings.storage_dir_override("lake") == Path("/data/lake")
    secret = settings.deid_secret_config()
    assert type(secret).__name__ == "EnvVar" and secret.env_var_name == "PSQA_DEID_SECRET"


def test_profiles_pick_the_stores(monkeypatch, tmp_path):
    """local (default): SQLite Dagster + MLflow under PSQA_HOME; team: the MLflow server's URL and a
    Dagster instance config on PostgreSQL (the driver named: SQLAlchemy 2.1 maps postgresql:// to
    psycopg 3); MLFLOW_TRACKING_URI still wins."""
    from psqa_pipelines import settings
    from psqa_pipelines.cli import instance_config

    for s in settings.ENV_SETTINGS:
        monkeypatch.delenv(s.name, raising=False)
    monkeypatch.setenv("PSQA_HOME", str(tmp_path))
    assert settings.profile() == "local" and settings.mlflow_ui_url() == "http://127.0.0.1:5000"
    assert "postgres" not in instance_config().split("telemetry:")[1]
    monkeypatch.setenv("PSQA_PROFILE", "team")
    assert settings.mlflow_tracking_uri() == "http://127.0.0.1:5001" == settings.mlflow_ui_url()
    cfg = instance_config()
    assert cfg.startswith("# psqa profile: team")
    assert 'postgres_url: "postgresql+psycopg2://psqa@127.0.0.1:5433/dagster"' in cfg
    import yaml

    assert yaml.safe_load(cfg)["storage"]["postgres"]["postgres_url"].endswith("/dagster")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert settings.mlflow_tracking_uri() == "http://mlflow.example:5000"
