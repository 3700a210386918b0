"""status checks: the database refuses a job or checkpoint status outside the state machine

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:00:00.000000

PostgreSQL gets CHECK constraints. SQLite cannot add a constraint to an existing table without
rebuilding it, and rebuilding ``checkpoint`` drops it first, which with foreign keys on cascades
into every layer row; triggers that abort the same writes enforce the same rule there.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration is fixed once released.
STATUSES = {
    "checkpoint": ("pending", "running", "done", "failed", "vanished"),
    "analysis_job": ("queued", "running", "done", "failed"),
}


def _condition(values: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    for table, values in STATUSES.items():
        if postgres:
            op.create_check_constraint(op.f(f"ck_{table}_status"), table, _condition(values))
            continue
        for event in ("INSERT", "UPDATE OF status"):
            verb = event.split()[0].lower()
            op.execute(
                f"CREATE TRIGGER trg_{table}_status_{verb} BEFORE {event} ON {table} "
                f"WHEN NOT (NEW.{_condition(values)}) "
                f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: ck_{table}_status'); END"
            )


def downgrade() -> None:
    postgres = op.get_context().dialect.name == "postgresql"
    for table in STATUSES:
        if postgres:
            op.drop_constraint(op.f(f"ck_{table}_status"), table, type_="check")
            continue
        for verb in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS trg_{table}_status_{verb}")
