"""weightwatcher names: its MP-fit and shuffle numbers under its names, ours under our own

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 05:00:00.000000

``num_spikes``, ``mp_softrank``, ``num_traps`` and ``rand_distance`` held alphawatch's own
measures (the MP edge of W's entry variance, the log-histogram distance), which differ from
weightwatcher 0.7.7's numbers of those names. From this revision they hold weightwatcher's
(docs/SPECTRAL.md), and ours move to ``edge_spikes``, ``edge_softrank``, ``shuffle_traps`` and
``shuffle_distance``: rows analysed before are copied there, and their weightwatcher-named
columns are set NULL. A value of the old definition left under weightwatcher's name is the
mismatch this revision removes, and weightwatcher's needs the spectrum refitted (the stored
ESD is float32 and the shuffle's is of one draw): a re-analysis fills them. The kept
``mp_softrank`` statistics of those rows go with them (a trend computes what is missing from
the layer rows). ``trap_localisation`` (JSON text): which neurons carry a correlation trap, for
trapped layers only.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# weightwatcher's name -> alphawatch's own name, and the column type
RENAMED = (
    ("num_spikes", "edge_spikes", sa.Integer),
    ("mp_softrank", "edge_softrank", sa.Float),
    ("num_traps", "shuffle_traps", sa.Integer),
    ("rand_distance", "shuffle_distance", sa.Float),
)


# Plain ALTER TABLE, never batch mode (see 0006).


def upgrade() -> None:
    for _, own, kind in RENAMED:
        op.add_column("layer_metric", sa.Column(own, kind(), nullable=True))
    op.add_column("layer_metric", sa.Column("trap_localisation", sa.Text(), nullable=True))
    moved = ", ".join(f"{own} = {ww}" for ww, own, _ in RENAMED)
    cleared = ", ".join(f"{ww} = NULL" for ww, _, _ in RENAMED)
    # One statement: every SET expression reads the row as it was before the UPDATE.
    op.execute(f"UPDATE layer_metric SET {moved}, {cleared}")
    op.execute("DELETE FROM checkpoint_stat WHERE metric = 'mp_softrank'")


def downgrade() -> None:
    # The old schema's columns meant alphawatch's measures: they get them back.
    restored = ", ".join(f"{ww} = {own}" for ww, own, _ in RENAMED)
    op.execute(f"UPDATE layer_metric SET {restored}")
    op.execute("DELETE FROM checkpoint_stat WHERE metric = 'mp_softrank'")
    op.drop_column("layer_metric", "trap_localisation")
    for _, own, _ in reversed(RENAMED):
        op.drop_column("layer_metric", own)
