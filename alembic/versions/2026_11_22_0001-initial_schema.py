"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 16:51:45.386471
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_token_token_hash")),
    )
    op.create_table(
        "run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run")),
        sa.UniqueConstraint("name", name=op.f("uq_run_name")),
    )
    op.create_table(
        "checkpoint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=False),
        sa.Column("format", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("discovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("analysis_s", sa.Float(), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("n_layers", sa.Integer(), nullable=True),
        sa.Column("n_trusted", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_checkpoint_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoint")),
        sa.UniqueConstraint("run_id", "step", name="uq_checkpoint_run_id_step"),
    )
    with op.batch_alter_table("checkpoint", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoint_run_id"), ["run_id"], unique=False)

    op.create_table(
        "analysis_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("worker_id", sa.String(length=255), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_analysis_job_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analysis_job")),
        sa.UniqueConstraint("checkpoint_id", name=op.f("uq_analysis_job_checkpoint_id")),
    )
    with op.batch_alter_table("analysis_job", schema=None) as batch_op:
        batch_op.create_index(
            "ix_analysis_job_status_lease", ["status", "lease_expires_at"], unique=False
        )

    op.create_table(
        "layer_metric",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("block", sa.Integer(), nullable=True),
        sa.Column("dtype", sa.String(length=32), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("fit_status", sa.String(length=32), nullable=False),
        sa.Column("trusted", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("cols", sa.Integer(), nullable=True),
        sa.Column("num_evals", sa.Integer(), nullable=True),
        sa.Column("lambda_max", sa.Float(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("alpha_weighted", sa.Float(), nullable=True),
        sa.Column("log_norm", sa.Float(), nullable=True),
        sa.Column("log_spectral_norm", sa.Float(), nullable=True),
        sa.Column("stable_rank", sa.Float(), nullable=True),
        sa.Column("log_alpha_norm", sa.Float(), nullable=True),
        sa.Column("D", sa.Float(), nullable=True),
        sa.Column("pl_xmin", sa.Float(), nullable=True),
        sa.Column("pl_xmax", sa.Float(), nullable=True),
        sa.Column("num_pl_spikes", sa.Integer(), nullable=True),
        sa.Column("sigma", sa.Float(), nullable=True),
        sa.Column("entropy", sa.Float(), nullable=True),
        sa.Column("matrix_rank", sa.Integer(), nullable=True),
        sa.Column("rank_loss", sa.Integer(), nullable=True),
        sa.Column("mp_bulk_max", sa.Float(), nullable=True),
        sa.Column("mp_sigma", sa.Float(), nullable=True),
        sa.Column("num_spikes", sa.Integer(), nullable=True),
        sa.Column("mp_softrank", sa.Float(), nullable=True),
        sa.Column("num_traps", sa.Integer(), nullable=True),
        sa.Column("rand_distance", sa.Float(), nullable=True),
        sa.Column("max_rand_eval", sa.Float(), nullable=True),
        sa.Column("mean_spike", sa.Boolean(), nullable=False),
        sa.Column("alpha_delta", sa.Float(), nullable=True),
        sa.Column("correlation_trap", sa.Boolean(), nullable=False),
        sa.Column("rank_collapse", sa.Boolean(), nullable=False),
        sa.Column("near_random", sa.Boolean(), nullable=False),
        sa.Column("over_trained", sa.Boolean(), nullable=False),
        sa.Column("under_trained", sa.Boolean(), nullable=False),
        sa.Column("warning", sa.String(length=32), nullable=True),
        sa.Column("elapsed_ms", sa.Float(), nullable=True),
        sa.Column("distance_from_init", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_layer_metric_checkpoint_id_checkpoint"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layer_metric")),
        sa.UniqueConstraint(
            "checkpoint_id", "name", "method", name="uq_layer_metric_checkpoint_id_name_method"
        ),
    )
    with op.batch_alter_table("layer_metric", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_layer_metric_checkpoint_id"), ["checkpoint_id"], unique=False
        )
        batch_op.create_index(
            "ix_layer_metric_name_checkpoint_id", ["name", "checkpoint_id"], unique=False
        )

    op.create_table(
        "spectrum",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("layer_metric_id", sa.Integer(), nullable=False),
        sa.Column("evals", sa.LargeBinary(), nullable=True),
        sa.Column("rand_evals", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["layer_metric_id"],
            ["layer_metric.id"],
            name=op.f("fk_spectrum_layer_metric_id_layer_metric"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spectrum")),
        sa.UniqueConstraint("layer_metric_id", name=op.f("uq_spectrum_layer_metric_id")),
    )


def downgrade() -> None:
    op.drop_table("spectrum")
    with op.batch_alter_table("layer_metric", schema=None) as batch_op:
        batch_op.drop_index("ix_layer_metric_name_checkpoint_id")
        batch_op.drop_index(batch_op.f("ix_layer_metric_checkpoint_id"))

    op.drop_table("layer_metric")
    with op.batch_alter_table("analysis_job", schema=None) as batch_op:
        batch_op.drop_index("ix_analysis_job_status_lease")

    op.drop_table("analysis_job")
    with op.batch_alter_table("checkpoint", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoint_run_id"))

    op.drop_table("checkpoint")
    op.drop_table("run")
    op.drop_table("api_token")
