"""The Lightning callback on a real ``lightning.Trainer`` training a tiny Llama, live."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from alphawatch.integrations.lightning import AlphaWatchCallback
from tests.db import wait_until
from tests.integrations.conftest import (
    HAS_SCAN_ROUTE,
    Live,
    Tokens,
    analysed_steps,
    tiny_llama,
    warnings_of,
)
from tests.pg import free_port


class TinyLlamaModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def quiet_trainer(*, max_steps: int, callbacks: list[Any], root: Path) -> pl.Trainer:
    """A CPU Lightning trainer with no logger, progress bar or model summary."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=root,
    )


def _fit(
    folder: Path, callback: pl.Callback, *, steps: int = 30, save_every: int = 10
) -> pl.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=folder,
        filename="{step}",
        save_top_k=-1,
        every_n_train_steps=save_every,
        save_weights_only=True,
    )
    trainer = quiet_trainer(max_steps=steps, callbacks=[callback, checkpoints], root=folder.parent)
    trainer.fit(TinyLlamaModule(), DataLoader(Tokens(), batch_size=8))  # type: ignore[arg-type]
    return trainer


def test_lightning_run_is_registered_and_every_saveanalysed_steps(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    folder = live.root / "lit-llama"
    callback = AlphaWatchCallback(url=live.url, token=live.token)
    trainer = _fit(folder, callback)
    assert trainer.global_step == 30
    assert sorted(p.name for p in folder.glob("*.ckpt")) == [
        "step=10.ckpt",
        "step=20.ckpt",
        "step=30.ckpt",
    ]

    run = callback.link.run
    assert run is not None and run.name == "lit-llama" and Path(run.path) == folder.resolve()
    wait_until(
        lambda: analysed_steps(live, run.id) == [10, 20, 30], 90, "steps 10, 20, 30 analysed"
    )
    layers = live.get(f"/runs/{run.id}/checkpoints/30/layers")["layers"]
    assert any(layer["name"].endswith("layers.1.self_attn.q_proj") for layer in layers)
    if HAS_SCAN_ROUTE:
        assert warnings_of(caplog) == []
    else:
        assert len(warnings_of(caplog)) == 1 and "scan" in warnings_of(caplog)[0]


def test_lightning_with_the_server_down_trains_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    callback = AlphaWatchCallback(url=f"http://127.0.0.1:{free_port()}", stop_on_gate=True)
    trainer = _fit(tmp_path / "ckpt", callback, steps=20, save_every=5)
    assert trainer.global_step == 20
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 4
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "cannot reach" in warnings[0], warnings
    assert not callback.stopped_by_gate


class _Slow(pl.Callback):
    """A few checkpoints a second, and a limit so a broken gate check cannot train for ever."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.fired = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        import time

        time.sleep(0.01)
        if trainer.global_step >= self.limit:
            self.fired = trainer.should_stop = True


def test_lightning_stops_when_the_gate_fails(failing_gate: Live, tmp_path: Path) -> None:
    live = failing_gate
    callback = AlphaWatchCallback(url=live.url, token=live.token, stop_on_gate=True)
    slow = _Slow(limit=5000)
    checkpoints = ModelCheckpoint(
        dirpath=live.root / "gated",
        filename="{step}",
        save_top_k=-1,
        every_n_train_steps=10,
        save_weights_only=True,
    )
    trainer = quiet_trainer(
        max_steps=100_000, callbacks=[callback, slow, checkpoints], root=tmp_path
    )
    trainer.fit(TinyLlamaModule(), DataLoader(Tokens(n=100_000), batch_size=8))  # type: ignore[arg-type]
    assert not slow.fired, "the failing gate did not stop training"
    assert callback.stopped_by_gate and trainer.global_step < 5000
    verdict = callback.link.last_verdict
    assert verdict is not None and verdict["passed"] is False and verdict["step"] is not None
