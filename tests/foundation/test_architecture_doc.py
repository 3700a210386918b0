"""docs/ARCHITECTURE.md states the import layers, the layer result, the fit statuses and the
trust thresholds once, and they are the code's."""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from pathlib import Path

# The engine's public surface, which stays put however its modules are split.
from alphawatch.workers.spectral import FitStatus, LayerResult, Thresholds

ROOT = Path(__file__).resolve().parents[2]


def _layers_in_pyproject() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(
        c for c in config["tool"]["importlinter"]["contracts"] if c.get("type") == "layers"
    )
    return [
        sorted(m.strip().removeprefix("alphawatch.") for m in layer.split("|"))
        for layer in contract["layers"]
    ]


def _layers_in_doc() -> list[list[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("`cli`;")]
    assert len(lines) == 1, "docs/ARCHITECTURE.md must state the layers once, on one line"
    return [sorted(m.strip().strip("`") for m in layer.split("|")) for layer in lines[0].split(";")]


def test_the_documented_layers_are_the_contracts() -> None:
    assert _layers_in_doc() == _layers_in_pyproject(), (
        "docs/ARCHITECTURE.md's layer line differs from the layers contract in pyproject.toml: "
        "copy the contract's layers there, top to bottom, `;` between layers, `|` between siblings"
    )


def _spectral_section() -> str:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    start = text.index("## workers.spectral")
    return text[start : text.index("\n## ", start + 1)]


def _declaration(section: str, opening: str) -> str:
    """The lines of the code block's declaration that starts with ``opening``, up to a blank."""
    start = section.index(opening)
    return section[start : section.index("\n\n", start)]


def test_the_documented_fit_statuses_are_the_enum() -> None:
    block = _declaration(_spectral_section(), "class FitStatus(")
    documented = re.findall(r'(\w+) = "(\w+)"', block)
    assert documented == [(s.name, s.value) for s in FitStatus], (
        "docs/ARCHITECTURE.md's FitStatus block differs from alphawatch.vocabulary.FitStatus: "
        'list every member as NAME = "value", in the enum\'s order'
    )


def test_the_documented_thresholds_are_the_model_with_its_defaults() -> None:
    block = _declaration(_spectral_section(), "class Thresholds(")
    documented = dict(re.findall(r"(\w+)=([^;\s]+)", block.partition("\n")[2]))
    fields = Thresholds.model_fields
    assert list(documented) == list(fields), (
        "docs/ARCHITECTURE.md's Thresholds block differs from alphawatch.trust.Thresholds: "
        f"missing {sorted(set(fields) - set(documented))}, "
        f"stale {sorted(set(documented) - set(fields))} (keep the model's order)"
    )
    for name, value in documented.items():
        assert ast.literal_eval(value) == fields[name].default, (
            f"docs/ARCHITECTURE.md gives {name}={value}, the code {fields[name].default!r}"
        )


def test_the_layer_result_table_names_every_field() -> None:
    section = _spectral_section()
    table = section[section.index("`LayerResult` (frozen dataclass)") :]
    documented: list[str] = []
    for line in table.splitlines()[1:]:
        if not line.startswith("|"):
            if documented:
                break
            continue
        cell = line.split("|")[1].strip()
        if cell in ("field", "") or set(cell) <= {"-", " "}:
            continue
        documented += [name.strip().strip("`") for name in cell.split(",")]
    fields = [f.name for f in dataclasses.fields(LayerResult)]
    assert len(documented) == len(set(documented)), "a LayerResult field is documented twice"
    assert set(documented) == set(fields), (
        "docs/ARCHITECTURE.md's LayerResult table differs from the dataclass: "
        f"missing {sorted(set(fields) - set(documented))}, "
        f"stale {sorted(set(documented) - set(fields))}"
    )
