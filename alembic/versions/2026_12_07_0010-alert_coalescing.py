"""alert coalescing: a superseded alert status, and when each alert's latest attempt began

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 01:20:00.000000

``alert.status`` may be ``superseded``: a newer verdict of the run replaced the alert before it
went out, or the verdict came back to the one the receiver was last told. ``alert.last_attempt_at``:
when the latest attempt began; a run's next alert waits ``ALPHAWATCH_ALERTS__MIN_INTERVAL_S``
after it. PostgreSQL swaps the CHECK constraint in place. SQLite cannot alter a CHECK, so the
``alert`` table is rebuilt from the definition written below (nothing references ``alert``, so
dropping the old table cascades nowhere); its rows, indexes and foreign key are kept.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration is fixed once released.
BEFORE = ("pending", "sending", "delivered", "failed")
AFTER = (*BEFORE, "superseded")


def _condition(values: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _alert(statuses: Sequence[str], *extra: sa.Column[datetime]) -> sa.Table:
    """The ``alert`` table as it stands before a rebuild on SQLite: what the rebuild copies."""
    return sa.Table(
        "alert",
        sa.MetaData(),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("previous", sa.Boolean(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("worker_id", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *extra,
        sa.CheckConstraint(_condition(statuses), name="ck_alert_status"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name="fk_alert_run_id_run", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_alert"),
        sa.Index("ix_alert_run_id", "run_id"),
        sa.Index("ix_alert_status_next_attempt_at", "status", "next_attempt_at"),
    )


def _last_attempt_at() -> sa.Column[datetime]:
    return sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.drop_constraint(op.f("ck_alert_status"), "alert", type_="check")
        op.create_check_constraint(op.f("ck_alert_status"), "alert", _condition(AFTER))
        op.add_column("alert", _last_attempt_at())
        return
    with op.batch_alter_table("alert", copy_from=_alert(BEFORE), recreate="always") as batch:
        batch.drop_constraint(op.f("ck_alert_status"), type_="check")
        batch.create_check_constraint(op.f("ck_alert_status"), _condition(AFTER))
        batch.add_column(_last_attempt_at())


def downgrade() -> None:
    # A superseded alert was never going to be sent: to 0009 it is a failed one.
    op.execute("UPDATE alert SET status = 'failed' WHERE status = 'superseded'")
    if op.get_context().dialect.name == "postgresql":
        op.drop_column("alert", "last_attempt_at")
        op.drop_constraint(op.f("ck_alert_status"), "alert", type_="check")
        op.create_check_constraint(op.f("ck_alert_status"), "alert", _condition(BEFORE))
        return
    with op.batch_alter_table(
        "alert", copy_from=_alert(AFTER, _last_attempt_at()), recreate="always"
    ) as batch:
        batch.drop_column("last_attempt_at")
        batch.drop_constraint(op.f("ck_alert_status"), type_="check")
        batch.create_check_constraint(op.f("ck_alert_status"), _condition(BEFORE))
