"""What every subcommand shares: exit codes, user errors, settings, the database check."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alphawatch.locations import ObjectURL
from alphawatch.settings import Settings

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2


class UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def settings_of(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for option, field in (
        ("db", "database_url"),
        ("device", "device"),
        ("host", "host"),
        ("port", "port"),
        ("poll", "poll_interval_s"),
        ("optimizer_state", "optimizer_state"),
        ("nested_widths", "nested_widths"),
        ("keep_up", "keep_up"),
        ("deltas", "deltas"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def check_dirs(paths: Sequence[Path | ObjectURL]) -> list[Path | ObjectURL]:
    from alphawatch.workers.watcher import RunDirError, check_run_dir

    try:
        return [check_run_dir(p) for p in paths]
    except RunDirError as exc:
        raise UserError(str(exc)) from exc


def prepare_database(settings: Settings, *, migrate: bool) -> None:
    from alphawatch.service.db.migrations import SchemaOutOfDate, upgrade, verify_schema
    from alphawatch.service.db.session import make_engine

    if migrate:
        upgrade(settings.database_url)
        return
    try:
        verify_schema(make_engine(settings.database_url))
    except SchemaOutOfDate as exc:
        raise UserError(str(exc)) from exc


def is_embedded(settings: Settings) -> bool:
    return settings.database_url.startswith("sqlite")


def stop_on_signals(stop: threading.Event, *, again: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT set ``stop``; a second one calls ``again`` (give the job back now)."""

    def handle(signum: int, _frame: object) -> None:
        log = logging.getLogger("alphawatch")
        if stop.is_set() and again is not None:
            log.info("signal %s again: giving the job in hand back to the queue", signum)
            again()
            return
        log.info("signal %s: finishing the job in hand (or giving it back)", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def exporter_of(settings: Settings) -> Any:
    """The worker's continuous export when ``ALPHAWATCH_EXPORT__*`` names a target, else None."""
    from alphawatch.integrations.export.continuous import ContinuousExport

    exporter = ContinuousExport(settings)
    return exporter if exporter.targets else None
