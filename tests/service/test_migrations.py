"""Migrations and models agree; a database behind the head is refused with a fix."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.db.migrations import SchemaOutOfDate, upgrade, verify_schema
from service.db.models import Base
from service.db.session import make_engine


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
