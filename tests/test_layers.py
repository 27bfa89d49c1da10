"""The package layering (pyproject.toml's import-linter contracts, README
"Architecture"): kept by the tree as it is, and broken by a wrong-way import."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "proxy", tmp_path / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_with(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess[str]:
    """The tree with `line` added to `module` (a path under proxy/), linted."""
    tree = copy_tree(tmp_path)
    path = tree / "proxy" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")
    return lint(tree)


def test_the_tree_keeps_every_layer_contract(tmp_path):
    result = lint(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_a_credential_module_importing_the_outbound_side_breaks_the_layers(tmp_path):
    result = lint_with(tmp_path, "credentials/policy.py", "from ..outbound import forward")
    assert result.returncode == 1
    assert "proxy.credentials.policy -> proxy.outbound.forward" in result.stdout


def test_the_simulator_importing_the_engine_breaks_its_contract(tmp_path):
    result = lint_with(tmp_path, "simulator/tokens.py", "from ..credentials import policy")
    assert result.returncode == 1
    assert "the simulator imports nothing of the sidecar" in result.stdout and "BROKEN" in result.stdout
