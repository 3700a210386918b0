"""The worker's exporter thread outlives whatever a tracker does, ``sys.exit()`` included."""

from __future__ import annotations

from pathlib import Path

from alphawatch.integrations.export.continuous import ContinuousExport
from alphawatch.integrations.export.trackers import TensorBoardTarget, TrackerRun
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.integrations.test_export import _tensorboard
from tests.workers.small import write_checkpoint


class ExitingTarget:
    """A tracker whose library gives up by calling ``sys.exit()`` (as some CLIs-turned-libraries
    do): a ``SystemExit`` is no ``Exception``, and it ended the export thread for good."""

    kind = "exiting"

    def open(self, run_name: str) -> TrackerRun:
        raise SystemExit(f"cannot log {run_name}")

    def shutdown(self) -> None:
        pass


def test_a_tracker_calling_sys_exit_never_ends_the_export(tmp_path: Path, pg_url: str) -> None:
    run = tmp_path / "runs" / "small"
    for step in (1, 2):
        write_checkpoint(run, step, seed=step)
    settings = Settings(database_url=pg_url, device="cpu", settle_s=0.0)
    logdir = tmp_path / "tb"
    exporter = ContinuousExport(settings, targets=[ExitingTarget(), TensorBoardTarget(logdir)])
    try:
        assert Watcher(settings, [run], on_analysed=exporter).run_once() == 2
        assert exporter.wait_idle(60), "the export thread ended with checkpoints handed over"
        assert exporter.failures >= 1
    finally:
        exporter.close()
    scalars = _tensorboard(logdir / "small")
    assert sorted(scalars["alphawatch/untrusted_share"]) == [1, 2], sorted(scalars)
