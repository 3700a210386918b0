"""docs/ARCHITECTURE.md states the import layers once, and they are pyproject's."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layers_in_pyproject() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c.get("type") == "layers")
    return [sorted(m.strip().removeprefix("alphawatch.") for m in layer.split("|"))
            for layer in contract["layers"]]


def _layers_in_doc() -> list[list[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("`cli`;")]
    assert len(lines) == 1, "docs/ARCHITECTURE.md must state the layers once, on one line"
    return [sorted(m.strip().strip("`") for m in layer.split("|"))
            for layer in lines[0].split(";")]


def test_the_documented_layers_are_the_contracts() -> None:
    assert _layers_in_doc() == _layers_in_pyproject(), (
        "docs/ARCHITECTURE.md's layer line differs from the layers contract in pyproject.toml: "
        "copy the contract's layers there, top to bottom, `;` between layers, `|` between siblings")
