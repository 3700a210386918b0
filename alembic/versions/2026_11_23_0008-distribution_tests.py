"""distribution tests: is each layer's tail a power law, and the live weightwatcher cross-check

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 17:40:00.000000

``layer_metric``: powerlaw's likelihood-ratio tests of the fitted tail against a truncated power
law and a lognormal (``pl_vs_tpl_R``/``_p``, ``pl_vs_lognormal_R``/``_p``; R > 0 favours the
power law), the truncated power law's exponent and rate (``tpl_alpha``, ``tpl_lambda``), the
fingers clip_xmax left out (``num_fingers``) and the cross-check's relative difference from
weightwatcher (``crosscheck_diff``). Rows analysed before this revision have them NULL.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FLOATS = (
    "tpl_alpha",
    "tpl_lambda",
    "pl_vs_tpl_R",
    "pl_vs_tpl_p",
    "pl_vs_lognormal_R",
    "pl_vs_lognormal_p",
    "crosscheck_diff",
)


# Plain ALTER TABLE, never batch mode (see 0006).


def upgrade() -> None:
    op.add_column("layer_metric", sa.Column("num_fingers", sa.Integer(), nullable=True))
    for name in FLOATS:
        op.add_column("layer_metric", sa.Column(name, sa.Float(), nullable=True))
    where = sa.text("crosscheck_diff IS NOT NULL")
    op.create_index(
        "ix_layer_metric_crosscheck_diff",
        "layer_metric",
        ["checkpoint_id", "crosscheck_diff"],
        postgresql_where=where,
        sqlite_where=where,
    )


def downgrade() -> None:
    op.drop_index("ix_layer_metric_crosscheck_diff", table_name="layer_metric")
    for name in reversed(FLOATS):
        op.drop_column("layer_metric", name)
    op.drop_column("layer_metric", "num_fingers")
