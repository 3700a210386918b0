"""gate alerts: per-run gate rules with the last verdict, and the alert outbox

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 17:40:00.000000

``run_gate``: one row per run holding the gate rules set through the API (JSON, the rules it
overrides) and the last verdict the worker recorded. ``alert``: one row per change of verdict,
with the JSON body to POST and the state of its delivery (attempts, next attempt, lease, last
error). New tables only, so SQLite takes the status CHECK in CREATE TABLE.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration is fixed once released.
ALERT_STATUSES = ("pending", "sending", "delivered", "failed")


def upgrade() -> None:
    op.create_table(
        "run_gate",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("rules", sa.Text(), server_default="{}", nullable=False),
        sa.Column("rules_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("violations", sa.Text(), nullable=True),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_run_gate_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_run_gate")),
    )
    statuses = "status IN (" + ", ".join(f"'{s}'" for s in ALERT_STATUSES) + ")"
    op.create_table(
        "alert",
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
        sa.CheckConstraint(statuses, name=op.f("ck_alert_status")),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_alert_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert")),
    )
    op.create_index(op.f("ix_alert_run_id"), "alert", ["run_id"])
    op.create_index("ix_alert_status_next_attempt_at", "alert", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_alert_status_next_attempt_at", table_name="alert")
    op.drop_index(op.f("ix_alert_run_id"), table_name="alert")
    op.drop_table("alert")
    op.drop_table("run_gate")
