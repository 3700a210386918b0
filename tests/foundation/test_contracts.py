"""The import contracts hold on the tree, and they really fail when a boundary is crossed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
if not LINT_IMPORTS.exists():
    # import-linter comes with the dev extra; `make contracts` runs it on its own too.
    pytest.skip("import-linter is not installed (pip install -e '.[dev]')", allow_module_level=True)
PACKAGES = ("alphawatch",)


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_contracts_hold_on_the_tree(tree_copy: Path) -> None:
    result = _lint(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        ("workers/spectral", "import sqlalchemy", "The spectral engine is pure math"),
        ("service/api", "import alphawatch.workers.spectral", "The service never computes"),
        ("dashboard", "import alphawatch.service.db", "The dashboard reads only"),
        ("workers/checkpoints", "import sqlalchemy", "Checkpoint reading knows"),
        ("workers/checkpoints", "import alphawatch.service.db", "Layers"),
        ("workers/spectral", "import alphawatch.workers.checkpoints", "Layers"),
        ("service/db", "import alphawatch.service.api", "Layers"),
        ("service/api", "import alphawatch.cli", "Layers"),
        ("integrations/hf.py", "import alphawatch.service.db", "Training-loop callbacks"),
        ("integrations/lightning.py", "import alphawatch.settings", "Training-loop callbacks"),
        ("integrations/link.py", "import torch", "The callbacks' shared client"),
        ("workers/watcher.py", "import alphawatch.integrations.export", "Layers"),
        ("workers/watcher.py", "from sqlalchemy import select", "The watcher writes no SQL"),
        ("integrations/export", "import alphawatch.cli", "Layers"),
    ],
)
def test_crossing_a_boundary_fails(
    tree_copy: Path, module: str, statement: str, contract: str
) -> None:
    target = tree_copy / "alphawatch" / module
    if module.endswith(".py"):  # a module of its own: the import is added to it
        target.write_text(target.read_text() + f"\n{statement}\n")
    else:
        (target / "_crossing.py").write_text(f"{statement}\n")
    result = _lint(tree_copy)
    assert result.returncode != 0, "lint-imports accepted a forbidden import"
    assert contract in result.stdout
    assert "BROKEN" in result.stdout
