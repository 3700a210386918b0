"""The Hugging Face callback on a real Trainer training a tiny Llama, against a live alphawatch."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

from transformers import Trainer, TrainerCallback, TrainingArguments

from alphawatch.integrations.hf import AlphaWatchCallback
from alphawatch.integrations.link import gate_failed
from tests.db import wait_until
from tests.integrations.conftest import (
    HAS_SCAN_ROUTE,
    Live,
    Tokens,
    analysed_steps,
    start_live,
    tiny_llama,
    warnings_of,
)
from tests.pg import free_port


def _args(out: Path, *, steps: int, save_every: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_every,
        save_strategy="steps",
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to="none",
        save_only_model=True,
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def _trainer(out: Path, callbacks: list[Any], *, steps: int = 30, save_every: int = 10) -> Trainer:
    return Trainer(
        model=tiny_llama(),
        args=_args(out, steps=steps, save_every=save_every),
        train_dataset=Tokens(),
        callbacks=callbacks,
    )


def test_trainer_run_is_registered_and_every_saveanalysed_steps(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    out = live.root / "tiny-llama"
    callback = AlphaWatchCallback(url=live.url, token=live.token)
    trainer = _trainer(out, [callback])
    trainer.train()
    assert trainer.state.global_step == 30

    run = callback.link.run
    assert run is not None, "the run was not registered"
    assert run.name == "tiny-llama" and Path(run.path) == out.resolve()
    # The folder is watched by the worker from registration on: every save is analysed.
    wait_until(
        lambda: analysed_steps(live, run.id) == [10, 20, 30], 90, "steps 10, 20, 30 analysed"
    )
    trend = live.get(f"/runs/{run.id}/trend?filter=all")
    assert [p["step"] for p in trend["points"]] == [10, 20, 30]
    assert all(p["n_used"] > 0 and p["value"] is not None for p in trend["points"])
    if HAS_SCAN_ROUTE:
        assert warnings_of(caplog) == []
    else:  # the nudge is refused (404) three times: one warning, and the poll does the rest
        assert len(warnings_of(caplog)) == 1 and "scan" in warnings_of(caplog)[0]
    layers = live.get(f"/runs/{run.id}/checkpoints/30/layers")["layers"]
    assert any(layer["name"] == "model.layers.1.mlp.down_proj" for layer in layers)

    # Training again into the same folder finds the run instead of making a second one.
    again = AlphaWatchCallback(url=live.url, token=live.token)
    _trainer(out, [again], steps=10).train()
    assert again.link.run is not None and again.link.run.id == run.id
    assert [r["name"] for r in live.get("/runs")["runs"]] == ["tiny-llama"]


def test_a_server_that_is_down_costs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    out = tmp_path / "offline-run"
    callback = AlphaWatchCallback(
        url=f"http://127.0.0.1:{free_port()}", token="x", stop_on_gate=True
    )
    trainer = _trainer(out, [callback], steps=20, save_every=5)
    started = time.monotonic()
    trainer.train()
    assert trainer.state.global_step == 20
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-15",
        "checkpoint-20",
        "checkpoint-5",
    ]
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert "cannot reach" in warnings[0] and "training goes on" in warnings[0]
    assert callback.link.run is None and not callback.stopped_by_gate
    assert time.monotonic() - started < 120


def test_a_refused_registration_costs_one_warning(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    callback = AlphaWatchCallback(url=live.url, token="not-a-token")
    trainer = _trainer(live.root / "refused", [callback], steps=20, save_every=5)
    trainer.train()
    assert trainer.state.global_step == 20
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "HTTP 401" in warnings[0], warnings
    assert callback.link.run is None and live.get("/runs")["runs"] == []


class _Guard(TrainerCallback):
    """Stops training after ``seconds`` (so a broken gate check cannot train for ever)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.fired = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(0.01)  # a few checkpoints a second: the worker keeps up
        if time.monotonic() > self.deadline:
            self.fired = control.should_training_stop = True


def test_stop_on_gate_stops_training_when_the_gate_fails(failing_gate: Live) -> None:
    live = failing_gate
    out = live.root / "gated"
    callback = AlphaWatchCallback(url=live.url, token=live.token, stop_on_gate=True)
    guard = _Guard(120)
    trainer = _trainer(out, [callback, guard], steps=100_000, save_every=10)
    trainer.train()
    assert not guard.fired, "the failing gate did not stop training"
    assert callback.stopped_by_gate
    assert trainer.state.global_step < 100_000
    verdict = callback.link.last_verdict
    assert verdict is not None and verdict["passed"] is False
    assert {v["rule"] for v in verdict["violations"]} & {"min_alpha", "no_trusted_layers"}
    # It stopped at a save after an analysed checkpoint failed, not before one was analysed.
    assert verdict["step"] is not None and verdict["step"] <= trainer.state.global_step


def test_a_gate_without_an_analysed_checkpoint_does_not_stop_training(live: Live) -> None:
    out = live.root / "early"
    callback = AlphaWatchCallback(url=live.url, token=live.token, stop_on_gate=True)
    trainer = _trainer(out, [callback], steps=10, save_every=10)
    trainer.train()
    # The gate fails for want of data at the only save: that is no reason to stop.
    verdict = callback.link.last_verdict
    assert verdict is not None and verdict["passed"] is False
    assert [v["rule"] for v in verdict["violations"]] == ["no_data"]
    assert trainer.state.global_step == 10
    assert not callback.stopped_by_gate


def test_only_a_failure_on_an_analysed_checkpoint_counts() -> None:
    no_data = {
        "passed": False,
        "step": None,
        "violations": [{"rule": "no_data", "message": "no analysed checkpoint yet"}],
    }
    failed = {"passed": False, "step": 20, "violations": [{"rule": "max_alpha"}]}
    assert not gate_failed(no_data)
    assert not gate_failed({"passed": True, "step": 20, "violations": []})
    assert gate_failed(failed)


@pytest.fixture
def slow_worker(pg_url: str, tmp_path: Path) -> Iterator[Live]:
    """A worker that polls every two minutes: only a nudge gets a checkpoint analysed soon."""
    yield from start_live(pg_url, tmp_path / "runs", poll_interval_s=120.0)


@pytest.mark.skipif(not HAS_SCAN_ROUTE, reason="the server has no POST /runs/{id}/scan yet")
def test_a_save_is_analysed_at_once_when_the_server_can_be_asked_to_scan(
    slow_worker: Live, caplog: pytest.LogCaptureFixture
) -> None:
    live = slow_worker
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    # The worker's first pass is over before the run exists; its next poll is minutes away.
    wait_until(lambda: live.watcher.passes >= 1, 60, "the worker's first pass")
    out = live.root / "nudged"
    callback = AlphaWatchCallback(url=live.url, token=live.token)
    _trainer(out, [callback], steps=10, save_every=10).train()
    saved = time.monotonic()
    run = callback.link.run
    assert run is not None
    wait_until(lambda: analysed_steps(live, run.id) == [10], 15, "step 10 analysed after the nudge")
    assert time.monotonic() - saved < 15
    assert warnings_of(caplog) == []
