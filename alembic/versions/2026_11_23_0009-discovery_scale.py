"""discovery at scale: "scan now" requests on runs, and the lease of the discovering worker

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 18:00:00.000000

``run.scan_requested_at``: when a "scan now" was asked for (``POST /api/v1/runs/{id}/scan``)
and not yet honoured; indexed, the discovering worker looks for requests every second.
``discovery_lease``: one row per lease (``discovery``): which worker discovers, until when.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, never batch mode (see 0006): on SQLite a batch drop recreates the table.


def upgrade() -> None:
    op.add_column("run", sa.Column("scan_requested_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_run_scan_requested_at", "run", ["scan_requested_at"])
    op.create_table(
        "discovery_lease",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_discovery_lease"),
    )


def downgrade() -> None:
    op.drop_table("discovery_lease")
    op.drop_index("ix_run_scan_requested_at", table_name="run")
    op.drop_column("run", "scan_requested_at")
