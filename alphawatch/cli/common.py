"""What every subcommand shares: exit codes, user errors, settings, the database check."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        ("deltas", "deltas"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def check_dirs(paths: Sequence[Path]) -> list[Path]:
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


def stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        logging.getLogger("alphawatch").info("signal %s: finishing the job in hand", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def exporter_of(settings: Settings) -> Any:
    """The worker's continuous export when ``ALPHAWATCH_EXPORT__*`` names a target, else None."""
    from alphawatch.integrations.export.continuous import ContinuousExport

    exporter = ContinuousExport(settings)
    return exporter if exporter.targets else None
