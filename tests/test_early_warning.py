"""scripts/early_warning.py: the alarm rules, the --quick study on real runs, and the document
generated from the committed full results."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from alphawatch.gate_rules import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "early_warning", ROOT / "scripts/early_warning.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["early_warning"] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    return module


ew = _script()


def test_the_training_spike_rule_reads_a_smoothed_loss() -> None:
    flat = [3.0] * 20
    assert ew.loss_alarms(flat, [])["train_spike"] is None
    # One noisy step at 1.6x does not lift the 5-step mean past 1.5x; a lasting rise does.
    assert ew.loss_alarms([*flat, 4.8, *flat], [])["train_spike"] is None
    rise = [*flat, *([5.0] * 10)]
    step = ew.loss_alarms(rise, [])["train_spike"]
    window = ew.SPIKE_WINDOW
    assert step is not None and 20 < step <= 20 + window
    assert sum(rise[step - window : step]) / window > ew.SPIKE_FACTOR * 3.0
    assert sum(rise[step - 1 - window : step - 1]) / window <= ew.SPIKE_FACTOR * 3.0
    # A loss that is not finite fires at once, on its own step.
    assert ew.loss_alarms([3.0, 2.9, math.nan], [])["train_spike"] == 3


def test_the_validation_rule_needs_k_rises_in_a_row() -> None:
    evals = [(10, 3.0), (20, 2.8), (30, 2.9), (40, 2.85), (50, 2.9), (60, 2.95), (70, 3.0)]
    got = ew.loss_alarms([3.0] * 70, evals)
    assert got["val_rising"] == 70 and got["any"] == 70  # 50, 60, 70 each above the one before
    assert ew.loss_alarms([3.0] * 70, evals[:-1])["val_rising"] is None


def test_signals_fire_from_the_arming_step_and_calibration_brackets_the_healthy() -> None:
    series = {
        "step": [10, 20, 30, 40],
        "median": [None, 3.0, 3.2, 1.5],
        "delta": [None, None, 0.2, -1.7],
        "untrusted_share": [1.0, 0.5, 0.25, 0.25],
        "traps": [0, 0, 0, 1],
        "collapsed": [0, 0, 0, 0],
        "n_layers": [4, 4, 4, 4],
    }
    t = ew.calibrate([series], arm=20)
    assert t["min_alpha"] == pytest.approx(1.5 - ew.BAND_MARGIN)
    assert t["max_alpha"] == pytest.approx(3.2 + ew.BAND_MARGIN)
    assert t["max_delta"] == pytest.approx(round(1.7 * ew.DELTA_FACTOR, 2))
    assert t["max_traps"] == 0.25
    # Armed at 20, the missing median at step 10 is not an alarm; armed at 10 it is.
    assert ew.first_fire(series, "alpha_low", ew.PRIOR, arm=20) == 40
    assert ew.first_fire(series, "alpha_low", ew.PRIOR, arm=10) == 10
    assert ew.first_fire(series, "max_delta", ew.PRIOR, arm=20) == 40
    assert ew.first_fire(series, "correlation_trap", ew.PRIOR, arm=20) == 40
    assert ew.first_fire(series, "rank_collapse", ew.PRIOR, arm=10) is None


def _check_schema(results: dict[str, Any]) -> None:
    rows = results["pathologies"]
    assert {r["name"] for r in rows} == set(ew.PATHOLOGIES)
    for r in rows:
        assert r.keys() >= {
            "name",
            "seed",
            "loss_alarm_step",
            "alphawatch_alarm_step",
            "signal",
            "lead_steps",
        }
        loss, ours = r["loss_alarm_step"], r["alphawatch_alarm_step"]
        assert r["lead_steps"] == (None if loss is None or ours is None else loss - ours)
        assert (r["signal"] is None) == (ours is None)
        # The gate's verdicts through the API agree with the study's reading of the same rules.
        assert r["preset_mismatches"] == 0
    healthy = {f"healthy-s{s}" for s in results["config"]["seeds"]}
    assert set(results["false_alarms"]) == healthy
    for entry in results["false_alarms"].values():
        assert set(entry["prior"]) == set(entry["calibrated"]) == set(ew.SIGNALS)


@pytest.mark.trains
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_mode_trains_analyses_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/early_warning.py"),
            "--quick",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    _check_schema(results)
    assert results["config"]["mode"] == "quick"
    assert results["config"]["preset"] == PRESETS["early-warning"]
    # Every run was analysed by the worker: a checkpoint every save_every steps, read back.
    for name, run in results["runs"].items():
        steps = run["series"]["step"]
        assert steps, name
        assert steps[0] == results["config"]["save_every"]
        assert all(n > 0 for n in run["series"]["n_layers"])
        assert len(run["eval_loss"]) >= len(steps) - 1  # a diverged run stops after its last save
    # The document's code renders these results too.
    text = ew.render(results, ew.image_links(results))
    assert all(f"### `{kind}`" in text for kind in ew.PATHOLOGIES)


def test_the_document_is_generated_from_the_committed_results() -> None:
    results = json.loads(ew.RESULTS.read_text())
    _check_schema(results)
    assert results["config"]["mode"] == "full"
    assert results["config"]["held_out"] is True
    assert results["config"]["preset"] == PRESETS["early-warning"], (
        "the shipped preset changed since the study ran: run scripts/early_warning.py again"
    )
    assert ew.render(results, ew.image_links(results)) == ew.DOC.read_text()
    for link in ew.image_links(results).values():
        assert (ew.DOC.parent / link).is_file()
