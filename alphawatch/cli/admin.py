"""`db`, `token` and `runs`: the operator's commands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from alphawatch.cli.common import (
    EXIT_OK,
    UserError,
    is_embedded,
    prepare_database,
    settings_of,
)


def run_db(args: argparse.Namespace) -> int:
    from alphawatch.service.db import queue
    from alphawatch.service.db.migrations import upgrade
    from alphawatch.service.db.session import make_engine

    if args.db_command == "queue-depth":
        if args.sql:
            print(queue.QUEUE_DEPTH_SQL)
            return EXIT_OK
        settings = settings_of(args)
        prepare_database(settings, migrate=False)
        with make_engine(settings.database_url).connect() as conn:
            print(queue.depth(conn))
        return EXIT_OK
    settings = settings_of(args)
    upgrade(settings.database_url)
    print(f"alphawatch: {settings.database_url} is at the latest schema")
    return EXIT_OK


def run_token(args: argparse.Namespace) -> int:
    from alphawatch.service.db import tokens
    from alphawatch.service.db.session import make_engine, session_scope

    settings = settings_of(args)
    prepare_database(settings, migrate=is_embedded(settings))
    try:
        with session_scope(make_engine(settings.database_url)) as session:
            if args.token_command == "create":
                print(
                    tokens.create_token(
                        session,
                        name=args.name,
                        scope=tokens.TokenScope(args.scope),
                        expires_in_days=args.expires_in,
                    )
                )
            elif args.token_command == "revoke":
                count = tokens.revoke_token(session, name=args.name)
                print(f"alphawatch: revoked {count} token(s) named {args.name!r}")
            else:
                _print_tokens(tokens.list_tokens(session))
    except tokens.TokenError as exc:
        raise UserError(str(exc)) from exc
    return EXIT_OK


def _print_tokens(found: Sequence[Any]) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)

    def when(moment: datetime | None) -> str:
        return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "-"

    rows = [("NAME", "SCOPE", "CREATED", "LAST USED", "EXPIRES", "STATE")]
    for t in found:
        state = (
            "revoked"
            if t.revoked_at is not None
            else "expired"
            if t.expires_at is not None and t.expires_at <= now
            else "active"
        )
        rows.append(
            (
                t.name,
                str(t.scope),
                when(t.created_at),
                when(t.last_used_at),
                when(t.expires_at),
                state,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def run_runs(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from alphawatch.service.db.models import Run
    from alphawatch.service.db.session import make_engine, session_scope

    settings = settings_of(args)
    prepare_database(settings, migrate=False)
    with session_scope(make_engine(settings.database_url)) as session:
        for run in session.scalars(select(Run).order_by(Run.id)):
            print(f"{run.id}\t{run.name}\t{run.path}")
    return EXIT_OK
