"""layer distances: how far each layer moved from the checkpoint before

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 04:00:00.000000

Five nullable columns on ``layer_metric``, filled on the weight rows of runs analysed with
``ALPHAWATCH_DELTAS`` prev or distances: ``change_fro`` (‖ΔW‖_F/‖W‖_F), ``change_spectral``
(‖ΔW‖₂/‖W‖₂), ``subspace_overlap`` (‖U_refᵀU‖_F²/k of the top-k singular subspaces),
``overlap_k`` (that k) and ``change_ref_step`` (the step compared with). Columns rather than a
table: the layer x step heatmap, the trend and the CSV export read them as they read alpha.
Rows written before stay NULL (no distance was measured).
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FLOATS = ("change_fro", "change_spectral", "subspace_overlap")


def upgrade() -> None:
    for name in _FLOATS:
        op.add_column("layer_metric", sa.Column(name, sa.Float(), nullable=True))
    op.add_column("layer_metric", sa.Column("overlap_k", sa.Integer(), nullable=True))
    op.add_column("layer_metric", sa.Column("change_ref_step", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # batch mode: SQLite rebuilds the table where it cannot drop a column in place.
    with op.batch_alter_table("layer_metric") as batch:
        for name in (*_FLOATS, "overlap_k", "change_ref_step"):
            batch.drop_column(name)
