"""Schema migrations (Alembic) and the start-up check that the database is at the single head."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import alphawatch
from alembic import command
from alphawatch.service.db.session import make_engine

# The migrations ship inside the package (alphawatch/migrations), so an installed wheel finds
# them from any working folder; the repository keeps them in alembic/ behind a symlink.
SCRIPT_LOCATION = Path(alphawatch.__file__).resolve().parent / "migrations"


class SchemaOutOfDate(RuntimeError):
    """The database is not at the schema this code expects."""


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    if url is not None:
        # ConfigParser interpolates '%': a password containing it must be escaped.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise SchemaOutOfDate(f"migrations have {len(heads)} heads; merge them first")
    return heads[0]


def upgrade(url: str) -> None:
    """Migrate the database at ``url`` to the latest schema (idempotent)."""
    engine = make_engine(url)
    with engine.begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def current(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def verify_schema(engine: Engine) -> None:
    """Refuse to run on a database that is not at the single head, and say how to fix it."""
    at, want = current(engine), head()
    if at != want:
        raise SchemaOutOfDate(
            f"database {engine.url.render_as_string(hide_password=True)} is at schema "
            f"{at or 'none'}, this alphawatch needs {want}: run `alphawatch db upgrade"
            f" --db URL` (or `docker compose run --rm migrate`)"
        )
