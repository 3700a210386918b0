"""discovery errors and re-analysis: what discovery refused, and checkpoints rewritten in place

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 15:30:00.000000

``run.discovery_error``: why the latest discovery pass could not list the run, or which of its
entries it refused without a step to record them under. ``checkpoint.discovery_error``: why
discovery refused this checkpoint (it is then ``failed`` without being read), or what it found
wrong with it since it was analysed. ``checkpoint.analysis_count`` and ``rewritten_at``: a
checkpoint whose files changed in place is analysed again, and the list shows it.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE, never batch mode: on SQLite a batch drop recreates the table, and
# dropping the old checkpoint table with foreign keys on would cascade into every result.


def upgrade() -> None:
    op.add_column("run", sa.Column("discovery_error", sa.Text(), nullable=True))
    op.add_column("checkpoint", sa.Column("discovery_error", sa.Text(), nullable=True))
    op.add_column(
        "checkpoint", sa.Column("analysis_count", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column(
        "checkpoint", sa.Column("rewritten_at", sa.DateTime(timezone=True), nullable=True)
    )
    # Checkpoints analysed before this revision were analysed once.
    op.execute("UPDATE checkpoint SET analysis_count = 1 WHERE status = 'done'")


def downgrade() -> None:
    op.drop_column("checkpoint", "rewritten_at")
    op.drop_column("checkpoint", "analysis_count")
    op.drop_column("checkpoint", "discovery_error")
    op.drop_column("run", "discovery_error")
