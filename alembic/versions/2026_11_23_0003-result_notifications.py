"""result notifications: NOTIFY alphawatch_results on every write to results

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 11:00:00.000000

API processes keep read responses in memory and drop them when this channel speaks
(``service.api.cache``). Statement-level triggers: one notification per table and transaction
(PostgreSQL folds identical ones), whatever wrote the rows. SQLite has no NOTIFY; its API
processes keep no responses.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("run", "checkpoint", "layer_metric", "checkpoint_stat")


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE FUNCTION alphawatch_notify_results() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('alphawatch_results', TG_TABLE_NAME);
            RETURN NULL;
        END
        $$""")
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER trg_{table}_notify_results "
            f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION alphawatch_notify_results()"
        )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_notify_results ON {table}")
    op.execute("DROP FUNCTION IF EXISTS alphawatch_notify_results()")
