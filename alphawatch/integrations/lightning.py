"""A Lightning callback that has alphawatch analyse each checkpoint as it is saved.

    from alphawatch.integrations.lightning import AlphaWatchCallback

    trainer = L.Trainer(..., callbacks=[ModelCheckpoint(dirpath="runs/my-model",
                                                        every_n_train_steps=500, save_top_k=-1),
                                        AlphaWatchCallback(url="http://alphawatch:8000")])

When fitting starts it registers the checkpoint folder (``trainer.checkpoint_callback.dirpath``)
as a run; after each save it asks the server to scan the folder now; with ``stop_on_gate=True``
it reads the run's gate after each save and sets ``trainer.should_stop`` when the gate fails on
an analysed checkpoint. Only global rank zero talks to the server; a server that is down costs
one warning and training goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from alphawatch.integrations.link import RunLink, is_url, log


class AlphaWatchCallback(pl.Callback):
    """Register the checkpoint folder, nudge the worker after each save, stop on a failing gate.

    Args:
        url: base URL of the alphawatch API; ``ALPHAWATCH_URL`` or http://127.0.0.1:8000.
        token: a ``write`` token; ``ALPHAWATCH_TOKEN`` when None.
        run_name: the run's name; the checkpoint folder's name when None.
        stop_on_gate: read the run's gate after each save and stop when it fails on an
            analysed checkpoint (the latest analysed: training stops at the first save after a
            failing checkpoint has been analysed).
        dirpath: the folder to register; the trainer's checkpoint folder when None. A URL
            (``s3://bucket/prefix/run``: Lightning writes checkpoints there through fsspec)
            is registered as written.
        timeout_s: the longest one call to the server may hold the training loop.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        run_name: str | None = None,
        stop_on_gate: bool = False,
        dirpath: str | Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.link = RunLink(url, token, run_name, timeout_s=timeout_s)
        self.stop_on_gate = stop_on_gate
        self.dirpath = _place(dirpath)
        self.stopped_by_gate = False
        self._unseen_save = False
        self._seen: tuple[Any, ...] = ()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folder = self.dirpath or _checkpoint_dir(trainer)
        if folder is None:
            log.warning(
                "alphawatch: this trainer saves no checkpoints (no ModelCheckpoint "
                "with a folder); nothing to watch"
            )
            return
        self.link.start(folder)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = _saves(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Called while a full checkpoint is being made, before its file is written: the scan
        # is asked for at the next hook, once the file is there. (Weights-only saves skip this
        # hook; they show in the checkpoint callbacks' state instead.)
        self._unseen_save = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._after_save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_save(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_save(trainer, last=True)

    def _after_save(self, trainer: pl.Trainer, *, last: bool = False) -> None:
        # Every rank saw the save (checkpoints are made on all of them): they take this branch
        # together, so the broadcast below is met by every rank.
        seen = _saves(trainer)
        if not self._unseen_save and seen == self._seen:
            return
        self._unseen_save, self._seen = False, seen
        failed = False
        if trainer.is_global_zero:
            self.link.saved()
            failed = self.stop_on_gate and not last and self.link.gate_failed()
        if not self.stop_on_gate or last:
            return
        if trainer.world_size > 1:
            failed = bool(trainer.strategy.broadcast(failed, src=0))
        if failed:
            self.stopped_by_gate = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                verdict = self.link.last_verdict or {}
                log.warning(
                    "alphawatch: the gate failed at step %s (%s): stopping training",
                    verdict.get("step"),
                    "; ".join(str(v.get("message")) for v in verdict.get("violations", [])),
                )


def _saves(trainer: pl.Trainer) -> tuple[Any, ...]:
    """What the checkpoint callbacks have saved so far; it changes with every save."""
    return tuple(
        (
            getattr(c, "_last_global_step_saved", None),
            getattr(c, "last_model_path", None),
            tuple(sorted(getattr(c, "best_k_models", {}) or {})),
        )
        for c in trainer.checkpoint_callbacks
    )


def _checkpoint_dir(trainer: pl.Trainer) -> str | Path | None:
    callback = trainer.checkpoint_callback
    return _place(getattr(callback, "dirpath", None) or None)


def _place(dirpath: str | Path | None) -> str | Path | None:
    """A folder as a ``Path``, a URL (``s3://...``) as its text: a ``Path`` collapses ``//``."""
    if dirpath is None:
        return None
    return dirpath if is_url(dirpath) else Path(dirpath)
