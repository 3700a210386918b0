"""claim order: a queued job's place in its run's backlog, and when each run was last served

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 03:00:00.000000

``analysis_job.priority``: the job's place in its run's coarse-to-fine order (0 the newest step,
then the first, the middle, the quarters …), written when discovery registers checkpoints.
``run.last_claimed_at``: when a worker last claimed one of the run's jobs; claims serve the run
waiting longest first. Jobs queued before this migration keep priority 0 and are claimed in the
order of their ids, as before, until discovery registers a new checkpoint of their run.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "analysis_job",
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("run", sa.Column("last_claimed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite rebuilds the tables where it cannot drop a column in place.
    with op.batch_alter_table("run") as batch:
        batch.drop_column("last_claimed_at")
    with op.batch_alter_table("analysis_job") as batch:
        batch.drop_column("priority")
