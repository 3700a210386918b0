"""skipped status: the keep-up policy passes a checkpoint over, visibly

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 04:00:00.000000

``checkpoint.status`` and ``analysis_job.status`` may be ``skipped``: a worker running with
``ALPHAWATCH_KEEP_UP`` kept its run's backlog to the bound and passed this checkpoint over.
PostgreSQL swaps the CHECK constraints in place. On SQLite the rule is kept by the triggers of
0004 (rebuilding ``checkpoint`` to change a CHECK would drop it first, which with foreign keys
on cascades into every layer row), so the triggers are dropped and made again with the new
list of values.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration is fixed once released.
BEFORE = {
    "checkpoint": ("pending", "running", "done", "failed", "vanished"),
    "analysis_job": ("queued", "running", "done", "failed"),
}
AFTER = {table: (*values, "skipped") for table, values in BEFORE.items()}


def _condition(values: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _allow(statuses: dict[str, tuple[str, ...]]) -> None:
    """Make each table's status rule the given list of values (the rule exists already)."""
    postgres = op.get_context().dialect.name == "postgresql"
    for table, values in statuses.items():
        if postgres:
            op.drop_constraint(op.f(f"ck_{table}_status"), table, type_="check")
            op.create_check_constraint(op.f(f"ck_{table}_status"), table, _condition(values))
            continue
        for event in ("INSERT", "UPDATE OF status"):
            verb = event.split()[0].lower()
            op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_status_{verb}")
            op.execute(
                f"CREATE TRIGGER trg_{table}_status_{verb} BEFORE {event} ON {table} "
                f"WHEN NOT (NEW.{_condition(values)}) "
                f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: ck_{table}_status'); END"
            )


def upgrade() -> None:
    _allow(AFTER)


def downgrade() -> None:
    # 0011 knows no skipping: a skipped checkpoint goes back to the queue, to be analysed, and
    # the keep-up note goes with its status.
    op.execute("UPDATE checkpoint SET status = 'pending', error = NULL WHERE status = 'skipped'")
    op.execute("UPDATE analysis_job SET status = 'queued' WHERE status = 'skipped'")
    _allow(BEFORE)
