"""The ``alphawatch`` command line.

alphawatch up RUN_DIR            API + dashboard + one worker, SQLite by default
alphawatch analyze PATH          one checkpoint, no database
alphawatch watch RUN_DIR...      worker only
alphawatch serve                 API + dashboard only
alphawatch gate --url U --run R  exit code for CI
alphawatch export mlflow|tensorboard|wandb --run R   robust statistics into a tracker
alphawatch db upgrade | token create|list|revoke | runs list
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from alphawatch.cli import admin, export, gate, serve
from alphawatch.cli.analyze import analyze_path, run_analyze
from alphawatch.cli.common import EXIT_ERROR, UserError
from alphawatch.cli.parser import build_parser
from alphawatch.text import EscapingFormatter

__all__ = ["analyze_path", "build_parser", "main"]


def _configure_logging(verbose: bool) -> None:
    # Every record is escaped where it is formatted: run and folder names are chosen by
    # whoever writes into a watched directory, and must never print a line of their own.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        handler = COMMANDS[args.command]
        return handler(args)
    except UserError as exc:
        print(f"alphawatch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": serve.run_up,
    "watch": serve.run_watch,
    "serve": serve.run_serve,
    "analyze": run_analyze,
    "gate": gate.run_gate,
    "export": export.run_export,
    "db": admin.run_db,
    "token": admin.run_token,
    "runs": admin.run_runs,
}
