"""single kind stats: alpha over each layer kind alone, filled for checkpoints analysed before

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 17:00:00.000000

Since 2026-12-07 the worker keeps, with each checkpoint's whole-model statistics, alpha over
each layer kind alone (the dashboard's "alpha by layer kind" panels ask for one kind each).
Checkpoints analysed before have none, and their single-kind trends were computed from the
layer rows on every request (4-8x slower). This revision fills them from the layer rows, a
batch of checkpoints at a time, with the thresholds each checkpoint's statistics were made with,
exactly as the worker makes them (``aggregates.single_kind_rows``). A checkpoint that has them
already is left as it is; the API computes any point without a kept row from the layer rows,
so an interrupted fill is never a wrong answer. Data only: the downgrade keeps the rows (an
older server never asks for them).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from alphawatch.service.db.aggregates import PRECOMPUTED_SINGLE_KINDS, single_kind_rows
from alphawatch.trust import Thresholds

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Checkpoints per batch: ~300 layer rows each, so a batch reads ~60,000 rows.
BATCH = 200
# What a selection of the weights' alpha reads of a layer row.
LAYER_COLUMNS = (
    "checkpoint_id",
    "name",
    "kind",
    "method",
    "alpha",
    "fit_status",
    "trusted",
    "correlation_trap",
    "rank_collapse",
)


def upgrade() -> None:
    connection = op.get_bind()
    meta = sa.MetaData()
    checkpoint = sa.Table("checkpoint", meta, autoload_with=connection)
    layer = sa.Table("layer_metric", meta, autoload_with=connection)
    stat = sa.Table("checkpoint_stat", meta, autoload_with=connection)
    default = Thresholds()
    singles = sorted(PRECOMPUTED_SINGLE_KINDS)
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
        made_with: dict[int, Thresholds] = {}
        have: set[tuple[int, str, str]] = set()
        for row in connection.execute(
            sa.select(
                stat.c.checkpoint_id,
                stat.c.method,
                stat.c.kinds,
                sa.func.min(stat.c.alpha_max),
                sa.func.min(stat.c.mad_k),
            )
            .where(stat.c.checkpoint_id.in_(ids))
            .group_by(stat.c.checkpoint_id, stat.c.method, stat.c.kinds)
        ):
            if row[2] == "":
                made_with[row[0]] = Thresholds(alpha_max=row[3], mad_k=row[4])
            if row[2] in PRECOMPUTED_SINGLE_KINDS:
                have.add((row[0], row[1], row[2]))
        by_checkpoint: dict[int, list[dict[str, object]]] = {i: [] for i in ids}
        result = connection.execute(
            sa.select(*(layer.c[c] for c in LAYER_COLUMNS)).where(
                layer.c.checkpoint_id.in_(ids), layer.c.kind.in_(singles)
            )
        )
        for layer_row in result.mappings():
            by_checkpoint[layer_row["checkpoint_id"]].append(dict(layer_row))
        rows = [
            r
            for checkpoint_id, layers in by_checkpoint.items()
            for r in single_kind_rows(
                layers,
                checkpoint_id=checkpoint_id,
                thresholds=made_with.get(checkpoint_id, default),
            )
            if (checkpoint_id, r["method"], r["kinds"]) not in have
        ]
        if rows:
            connection.execute(sa.insert(stat), rows)


def downgrade() -> None:
    pass
