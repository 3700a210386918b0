"""Migrations and models agree; a database behind the head is refused with a fix."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from alembic import command
from alphawatch.service.db.migrations import SchemaOutOfDate, alembic_config, upgrade, verify_schema
from alphawatch.service.db.models import Base
from alphawatch.service.db.session import make_engine


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
