"""A Hugging Face ``Trainer`` callback that has alphawatch analyse each checkpoint as it is saved.

    from alphawatch.integrations.hf import AlphaWatchCallback

    trainer = Trainer(..., callbacks=[AlphaWatchCallback(url="http://alphawatch:8000",
                                                         token=os.environ["ALPHAWATCH_TOKEN"])])

On train begin it registers ``args.output_dir`` (or ``path``: a URL such as
``s3://bucket/prefix/run`` where a sync job uploads the output folder) as a run (the existing
run when it is known already); after each save it asks the server to scan the folder now
instead of at the worker's next poll; with ``stop_on_gate=True`` it reads the run's gate after
each save and stops training when the gate fails on an analysed checkpoint. Only the world's
process zero talks to the server. A server that is down costs one warning; training goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from alphawatch.integrations.link import RunLink, is_url, log


class AlphaWatchCallback(TrainerCallback):
    """Register the run, nudge the worker after each save, optionally stop on a failing gate.

    Args:
        url: base URL of the alphawatch API; ``ALPHAWATCH_URL`` or http://127.0.0.1:8000.
        token: a ``write`` token; ``ALPHAWATCH_TOKEN`` when None.
        run_name: the run's name; the output folder's name when None.
        stop_on_gate: read ``GET /runs/{id}/gate`` (the server's rules for the run) after each
            save and set ``control.should_training_stop`` when it fails on an analysed
            checkpoint. The gate judges the latest *analysed* checkpoint, so training stops at
            the first save after a failing checkpoint has been analysed.
        timeout_s: the longest one call to the server may hold the training loop.
        path: where the checkpoints are watched, when not ``args.output_dir``: a local folder
            or an object-store URL (``s3://bucket/prefix/run``, ``gs://...``), registered as
            written. An ``output_dir`` that is itself a URL is registered as that URL.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        run_name: str | None = None,
        stop_on_gate: bool = False,
        timeout_s: float = 5.0,
        path: str | Path | None = None,
    ) -> None:
        self.link = RunLink(url, token, run_name, timeout_s=timeout_s)
        self.path = path
        self.stop_on_gate = stop_on_gate
        self.stopped_by_gate = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        where = self.path if self.path is not None else args.output_dir
        if state.is_world_process_zero and where:
            # A URL stays text: Path("s3://b/run") would be the local path s3:/b/run.
            self.link.start(where if is_url(where) else Path(where))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        failed = False
        if state.is_world_process_zero:
            self.link.saved()
            failed = self.stop_on_gate and self.link.gate_failed()
        if self.stop_on_gate and _agreed(failed, args):
            self.stopped_by_gate = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                log.warning(
                    "alphawatch: the gate failed at step %s (%s): stopping training",
                    (self.link.last_verdict or {}).get("step"),
                    _violations(self.link),
                )


def _agreed(failed: bool, args: TrainingArguments) -> bool:
    """Process zero's verdict on every process: one rank stopping alone would hang the rest."""
    if getattr(args, "world_size", 1) <= 1:
        return failed
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return failed
    flag = [failed]
    dist.broadcast_object_list(flag, src=0)
    return bool(flag[0])


def _violations(link: RunLink) -> str:
    verdict = link.last_verdict or {}
    return "; ".join(str(v.get("message", v.get("rule"))) for v in verdict.get("violations", []))
