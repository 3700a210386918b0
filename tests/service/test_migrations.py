"""Migrations and models agree; a database behind the head is refused with a fix."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from alembic import command
from alphawatch.service.db import queue, registry
from alphawatch.service.db.migrations import SchemaOutOfDate, alembic_config, upgrade, verify_schema
from alphawatch.service.db.models import Base
from alphawatch.service.db.session import make_engine, session_scope


def test_models_match_migrations(db_url: str) -> None:
    with make_engine(db_url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert not diff, (
        f"models and migrations differ: {diff}\nFix: `alembic -c alembic.ini revision "
        "--autogenerate -m 'what changed'`, review it, and commit it under alembic/versions/."
    )


def test_unmigrated_database_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(SchemaOutOfDate, match="alphawatch db upgrade"):
        verify_schema(make_engine(url))
    upgrade(url)
    upgrade(url)  # idempotent
    verify_schema(make_engine(url))


def _migrate(url: str, verb: str, revision: str) -> None:
    with make_engine(url).begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        getattr(command, verb)(config, revision)


def _notify_triggers(url: str) -> set[str]:
    with make_engine(url).connect() as connection:
        return set(
            connection.exec_driver_sql(
                "SELECT tgname FROM pg_trigger WHERE tgname LIKE 'trg_%%_notify_results'"
            ).scalars()
        )


def test_every_migration_is_reversible(db_url: str) -> None:
    postgres = db_url.startswith("postgresql")
    if postgres:
        assert _notify_triggers(db_url) == {
            f"trg_{t}_notify_results"
            for t in ("run", "checkpoint", "layer_metric", "checkpoint_stat", "block_stat")
        }
    _migrate(db_url, "downgrade", "0002")
    if postgres:
        assert _notify_triggers(db_url) == set()
    _migrate(db_url, "downgrade", "base")
    with make_engine(db_url).connect() as connection:
        left = set(inspect(connection).get_table_names())
    assert not {"run", "checkpoint", "layer_metric", "checkpoint_stat"} & left
    upgrade(db_url)
    verify_schema(make_engine(db_url))
    test_models_match_migrations(db_url)


def _statuses(url: str) -> tuple[set[str], set[str]]:
    with make_engine(url).connect() as connection:
        return (
            set(connection.exec_driver_sql("SELECT status FROM checkpoint").scalars()),
            set(connection.exec_driver_sql("SELECT status FROM analysis_job").scalars()),
        )


def test_skipped_status_migration_up_and_down(db_url: str) -> None:
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        run_id = registry.ensure_run(session, name="r", path="/r")
        for step in range(6):
            registry.register_checkpoint(
                session, run_id=run_id, step=step, path=f"/r/{step}", fingerprint="f", fmt="hf"
            )
        queue.reorder(session, run_id=run_id)
        assert queue.keep_up(session, run_id=run_id, bound=3) == 3
    assert _statuses(db_url) == ({"pending", "skipped"}, {"queued", "skipped"})
    _migrate(db_url, "downgrade", "0011")
    # 0011 knows no skipping: the skipped checkpoints are queued again, their note gone.
    assert _statuses(db_url) == ({"pending"}, {"queued"})
    with make_engine(db_url).connect() as connection:
        errors = set(connection.exec_driver_sql("SELECT error FROM checkpoint").scalars())
    assert errors == {None}
    for table in ("checkpoint", "analysis_job"):
        with pytest.raises(IntegrityError, match="status"), make_engine(db_url).begin() as c:
            c.exec_driver_sql(f"UPDATE {table} SET status = 'skipped'")
    _migrate(db_url, "upgrade", "0012")
    with session_scope(make_engine(db_url)) as session:
        assert queue.keep_up(session, run_id=run_id, bound=3) == 3
    assert _statuses(db_url) == ({"pending", "skipped"}, {"queued", "skipped"})
    for table in ("checkpoint", "analysis_job"):
        with pytest.raises(IntegrityError, match="status"), make_engine(db_url).begin() as c:
            c.exec_driver_sql(f"UPDATE {table} SET status = 'bogus'")
    _migrate(db_url, "upgrade", "head")
    verify_schema(make_engine(db_url))
