"""checkpoint stat: robust statistics per checkpoint, kept at write time

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 17:17:26.190137
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows for checkpoints analysed before this revision are absent; the API computes those
    # points from the layer rows, so no backfill is needed for correct answers.
    op.create_table(
        "checkpoint_stat",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("filter", sa.String(length=16), nullable=False),
        sa.Column("outliers", sa.String(length=16), nullable=False),
        sa.Column("kinds", sa.String(length=200), nullable=False),
        sa.Column("alpha_max", sa.Float(), nullable=False),
        sa.Column("mad_k", sa.Float(), nullable=False),
        sa.Column("n_used", sa.Integer(), nullable=False),
        sa.Column("n_excluded", sa.Integer(), nullable=False),
        sa.Column("excluded", sa.Text(), nullable=False),
        sa.Column("median", sa.Float(), nullable=True),
        sa.Column("mean", sa.Float(), nullable=True),
        sa.Column("trimmed_mean", sa.Float(), nullable=True),
        sa.Column("p10", sa.Float(), nullable=True),
        sa.Column("p25", sa.Float(), nullable=True),
        sa.Column("p75", sa.Float(), nullable=True),
        sa.Column("p90", sa.Float(), nullable=True),
        sa.Column("iqr", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_checkpoint_stat_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoint_stat")),
        sa.UniqueConstraint(
            "checkpoint_id",
            "method",
            "metric",
            "filter",
            "outliers",
            "kinds",
            name="uq_checkpoint_stat_key",
        ),
    )


def downgrade() -> None:
    op.drop_table("checkpoint_stat")
