"""block stat: robust statistics per block, kept at write time; filled from the layer rows

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 04:00:00.000000

``block_stat`` holds, per analysed checkpoint, the robust statistics of alpha over each block's
layers (per fit method, variant, kind set, filter and outlier rule), as ``checkpoint_stat``
holds them for the whole model. Checkpoints analysed before this revision are filled here from
their layer rows, a batch of checkpoints at a time (a long run's database holds millions of
layer rows), with the thresholds their ``checkpoint_stat`` rows were made with; the API
computes any point without a kept row from the layer rows, so an interrupted fill is never a
wrong answer.

Two covering indexes replace ``layer_metric``'s name and foreign-key indexes: a layer's history,
and a checkpoint's layers of one method (heatmaps, flags, statistics computed from rows),
are read from the index alone on PostgreSQL instead of from ~400-byte rows scattered over the
table.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from alphawatch.service.db.aggregates import block_stat_rows
from alphawatch.trust import Thresholds

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Checkpoints per batch: ~300 layer rows each, so a batch reads ~60,000 rows.
BATCH = 200
LAYER_COLUMNS = (
    "checkpoint_id",
    "name",
    "kind",
    "block",
    "method",
    "alpha",
    "fit_status",
    "trusted",
    "correlation_trap",
    "rank_collapse",
)


# What the covering indexes carry, as this revision made them.
HISTORY_COLUMNS = (
    "alpha",
    "D",
    "num_pl_spikes",
    "fit_status",
    "trusted",
    "correlation_trap",
    "rank_collapse",
)
SELECTION_COLUMNS = (
    "name",
    "kind",
    "alpha",
    "fit_status",
    "trusted",
    "correlation_trap",
    "rank_collapse",
    "near_random",
    "over_trained",
    "under_trained",
)


def upgrade() -> None:
    op.create_table(
        "block_stat",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("variant", sa.String(length=16), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("filter", sa.String(length=16), nullable=False),
        sa.Column("outliers", sa.String(length=16), nullable=False),
        sa.Column("kinds", sa.String(length=200), nullable=False),
        sa.Column("block", sa.Integer(), nullable=False),
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
            name=op.f("fk_block_stat_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_block_stat")),
        sa.UniqueConstraint(
            "checkpoint_id",
            "method",
            "variant",
            "metric",
            "filter",
            "outliers",
            "kinds",
            "block",
            name="uq_block_stat_key",
        ),
    )
    _fill()
    # Covering indexes (PostgreSQL reads the views from them alone; SQLite gets the keys):
    # they replace the name and foreign-key indexes, whose keys they lead with.
    op.create_index(
        "ix_layer_metric_history",
        "layer_metric",
        ["name", "method", "checkpoint_id"],
        postgresql_include=list(HISTORY_COLUMNS),
    )
    op.create_index(
        "ix_layer_metric_selection",
        "layer_metric",
        ["checkpoint_id", "method", "block"],
        postgresql_include=list(SELECTION_COLUMNS),
    )
    op.drop_index("ix_layer_metric_name_checkpoint_id", table_name="layer_metric")
    op.drop_index("ix_layer_metric_checkpoint_id", table_name="layer_metric")
    if op.get_context().dialect.name == "postgresql":
        # Written like every result table: API processes drop their kept answers.
        op.execute(
            "CREATE TRIGGER trg_block_stat_notify_results "
            "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON block_stat "
            "FOR EACH STATEMENT EXECUTE FUNCTION alphawatch_notify_results()"
        )


def _fill() -> None:
    """Block statistics of every analysed checkpoint, from its layer rows, batch by batch."""
    connection = op.get_bind()
    meta = sa.MetaData()
    checkpoint = sa.Table("checkpoint", meta, autoload_with=connection)
    layer = sa.Table("layer_metric", meta, autoload_with=connection)
    stat = sa.Table("checkpoint_stat", meta, autoload_with=connection)
    block = sa.Table("block_stat", meta, autoload_with=connection)
    default = Thresholds()
    last = 0
    while True:
        ids = list(
            connection.execute(
                sa.select(checkpoint.c.id)
                .where(checkpoint.c.status == "done", checkpoint.c.id > last)
                .order_by(checkpoint.c.id)
                .limit(BATCH)
            ).scalars()
        )
        if not ids:
            return
        last = ids[-1]
        # The thresholds the whole-model statistics of each checkpoint were made with.
        made_with = {
            row[0]: Thresholds(alpha_max=row[1], mad_k=row[2])
            for row in connection.execute(
                sa.select(
                    stat.c.checkpoint_id, sa.func.min(stat.c.alpha_max), sa.func.min(stat.c.mad_k)
                )
                .where(stat.c.checkpoint_id.in_(ids))
                .group_by(stat.c.checkpoint_id)
            )
        }
        by_checkpoint: dict[int, list[dict[str, object]]] = {i: [] for i in ids}
        result = connection.execute(
            sa.select(*(layer.c[c] for c in LAYER_COLUMNS)).where(
                layer.c.checkpoint_id.in_(ids), layer.c.block.is_not(None)
            )
        )
        for row in result.mappings():
            by_checkpoint[row["checkpoint_id"]].append(dict(row))
        rows = [
            r
            for checkpoint_id, layers in by_checkpoint.items()
            for r in block_stat_rows(
                layers,
                checkpoint_id=checkpoint_id,
                thresholds=made_with.get(checkpoint_id, default),
            )
        ]
        if rows:
            connection.execute(sa.insert(block), rows)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS trg_block_stat_notify_results ON block_stat")
    op.create_index("ix_layer_metric_checkpoint_id", "layer_metric", ["checkpoint_id"])
    op.create_index("ix_layer_metric_name_checkpoint_id", "layer_metric", ["name", "checkpoint_id"])
    op.drop_index("ix_layer_metric_selection", table_name="layer_metric")
    op.drop_index("ix_layer_metric_history", table_name="layer_metric")
    op.drop_table("block_stat")
