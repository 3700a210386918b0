"""shared answers: read answers kept for every API process; notifications name their commit

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 15:00:00.000000

Each API process keeps its read answers in memory (``service.api.cache``); ``api_answer`` is
the tier they share, so that an answer one process computed is every process's answer until
the results change. Its rows are a cache: the table is UNLOGGED on PostgreSQL (not written to
the WAL, emptied after a crash) and holds only answers made since the last notification.

Every notification now names the transaction that sent it (``<table>:<txid>``): listeners
receive them in commit order, so two API processes whose last notification is the same one
have seen the same results, and that payload is the key their answers are shared under.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _notify_function(payload: str) -> str:
    return f"""
        CREATE OR REPLACE FUNCTION alphawatch_notify_results() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('alphawatch_results', {payload});
            RETURN NULL;
        END
        $$"""


def upgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    op.create_table(
        "api_answer",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("token", sa.String(length=128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_api_answer")),
        prefixes=["UNLOGGED"] if postgres else [],
    )
    if postgres:
        op.execute(_notify_function("TG_TABLE_NAME || ':' || txid_current()::text"))


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute(_notify_function("TG_TABLE_NAME"))
    op.drop_table("api_answer")
