"""The code location loads, and the asset graph matches its snapshot (keys, deps, groups,
kinds, owners, partitions, automation, checks, jobs, sensors).

Update the snapshot after an intended graph change with
``pytest psqa_pipelines_tests/test_definitions.py --snapshot-update``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dagster as dg

from psqa_pipelines_tests.conftest import REPO


def _graph_summary(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        spec = next((s for s in defs.resolve_all_asset_specs() if s.key == key), None)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(d.to_user_string() for d in node.parent_keys),
            "kinds": sorted(spec.kinds) if spec else [],
            "owners": sorted(spec.owners) if spec else [],
            "partitioned": node.partitions_def is not None,
            "automation": node.automation_condition.get_label() if node.automation_condition else None,
            "has_description": bool(spec and spec.description),
            "checks": sorted(c.name for c in graph.get_check_keys_for_assets({key})),
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")),
        "sensors": sorted(s.name for s in defs.sensors or []),
        "resources": sorted(defs.resources),
    }


def test_definitions_load():
    from psqa_pipelines.definitions import defs

    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("ingest_study_job").partitions_def is not None


def test_every_asset_is_documented_and_owned():
    from psqa_pipelines.definitions import defs

    summary = _graph_summary(defs)["assets"]
    for key, info in summary.items():
        assert info["has_description"], f"{key} has no description"
        assert info["owners"], f"{key} has no owner"
        assert info["kinds"], f"{key} has no kinds"
        assert info["group"] != "default", f"{key} is in the default group"


def test_graph_snapshot(snapshot):
    from psqa_pipelines.definitions import defs

    assert _graph_summary(defs) == snapshot


def test_workspace_yaml_points_at_definitions():
    text = (REPO / "workspace.yaml").read_text()
    assert "psqa_pipelines.definitions" in text


def test_ml_never_imports_dagster_or_mlflow():
    """Static check of every ml/ module, plus a clean-interpreter import of all of them."""
    forbidden = {"dagster", "mlflow", "dagster_webserver"}
    offenders = []
    modules = []
    for path in sorted((REPO / "ml").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in forbidden:
                    offenders.append(f"{path.relative_to(REPO)}: {n}")
        rel = path.relative_to(REPO).with_suffix("")
        if rel.name != "__main__":
            modules.append(".".join(rel.parts).removesuffix(".__init__"))
    assert not offenders, offenders
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'dagster', 'mlflow'})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ml_core_imports_with_only_gpu_node_packages():
    """The GPU node has torch, numpy, pandas and pyarrow only: `import ml` and the OpenKBP
    reader must not pull pydicom, nibabel, SimpleITK or matplotlib at import time."""
    code = (
        "import sys, ml, ml.cli, ml.data.openkbp, ml.data.volume, ml.utils.io\n"
        "banned = {'pydicom', 'nibabel', 'SimpleITK', 'matplotlib'}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_required_layout_exists():
    for name in (
        "psqa_pipelines",
        "psqa_pipelines_tests",
        "ml",
        "workspace.yaml",
        "pyproject.toml",
        "setup.py",
        "README.md",
        "Makefile",
        ".ci/run",
        "benchmarks",
        "constraints.txt",
    ):
        assert (REPO / name).exists(), name
    assert Path(REPO / "psqa_pipelines" / "instance" / "dagster.yaml").exists()
