"""SQLAlchemy 2.0 models. Table names are singular snake_case; constraint names are explicit."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CheckpointStatus(StrEnum):
    """Where a checkpoint's analysis stands; the strings are what the API and dashboard show."""

    PENDING = "pending"  # discovered, its job is queued
    RUNNING = "running"  # a worker holds its job's lease and is analysing it
    DONE = "done"  # analysed: its layer rows are complete
    FAILED = "failed"  # given up: unreadable, refused, over a budget, or its workers kept dying
    VANISHED = "vanished"  # deleted (rotation) before or while it was read
    # Passed over by the keep-up policy (ALPHAWATCH_KEEP_UP): its run's backlog was over the
    # bound and it was neither the newest nor on the coarse-to-fine backbone; re-queued by a
    # re-analysis or by a worker with the policy off.
    SKIPPED = "skipped"


class JobStatus(StrEnum):
    """Where a checkpoint's queue entry stands; moves together with :class:`CheckpointStatus`."""

    QUEUED = "queued"  # waiting for a worker to claim it
    RUNNING = "running"  # claimed: a worker holds a lease on it
    DONE = "done"  # its results are written
    FAILED = "failed"  # no further attempt will be made (the checkpoint says why)
    SKIPPED = "skipped"  # left unclaimed by the keep-up policy until it is re-queued


def _one_of(enum: type[StrEnum]) -> str:
    return "status IN (" + ", ".join(f"'{member.value}'" for member in enum) + ")"


class Run(Base):
    """A training run: one directory of checkpoints."""

    __tablename__ = "run"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Why the latest discovery pass could not list the run, or which entries it refused that
    # have no step to be recorded under (names that are not UTF-8, steps beyond 64 bits).
    discovery_error: Mapped[str | None] = mapped_column(Text)
    # When a "scan now" was asked for (POST /runs/{id}/scan) and not yet honoured; indexed so
    # that the discovering worker can look for requests every second at no cost.
    scan_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    # When a worker last claimed one of its jobs: claims serve the run waiting longest first,
    # so one run's backlog never holds back another run's new checkpoint.
    last_claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DiscoveryLease(Base):
    """Which worker discovers: one at a time, all of them analyse.

    The holder renews ``expires_at`` while it works; once it has run out (the holder died or
    hangs), another worker takes the lease over.
    """

    __tablename__ = "discovery_lease"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Checkpoint(Base):
    """One saved step of a run and the state of its analysis."""

    __tablename__ = "checkpoint"
    __table_args__ = (
        UniqueConstraint("run_id", "step", name="uq_checkpoint_run_id_step"),
        CheckConstraint(_one_of(CheckpointStatus), name="status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128), default="")
    format: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default=CheckpointStatus.PENDING.value)
    error: Mapped[str | None] = mapped_column(Text)
    discovered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    analysis_s: Mapped[float | None] = mapped_column(Float)
    device: Mapped[str | None] = mapped_column(String(32))
    n_layers: Mapped[int | None] = mapped_column(Integer)
    n_trusted: Mapped[int | None] = mapped_column(Integer)
    # Why discovery refused it (then failed without being read), or what discovery found wrong
    # with it after it was analysed (e.g. its folder now resolves outside the allowed roots).
    discovery_error: Mapped[str | None] = mapped_column(Text)
    # Completed analyses: more than one when its files were rewritten in place (or re-queued).
    analysis_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When discovery last saw its files change after analysis and queued it again.
    rewritten_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# The columns the covering indexes of layer_metric carry (migration 0013).
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


class LayerMetric(Base):
    """Spectral metrics of one weight matrix at one checkpoint, for one fit method."""

    __tablename__ = "layer_metric"
    __table_args__ = (
        UniqueConstraint(
            "checkpoint_id", "name", "method", name="uq_layer_metric_checkpoint_id_name_method"
        ),
        # What the views read, from the index alone on PostgreSQL (an index-only scan: a long
        # run's layer rows are ~400 bytes wide, their scattered heap pages are what a cold read
        # waits for). One layer's history: its entries lie together, a run's in a few pages.
        Index(
            "ix_layer_metric_history",
            "name",
            "method",
            "checkpoint_id",
            postgresql_include=list(HISTORY_COLUMNS),
        ),
        # Heatmaps, flags and statistics computed from layer rows: a checkpoint's layers of one
        # method, a block range inside them. Also the foreign key's index.
        Index(
            "ix_layer_metric_selection",
            "checkpoint_id",
            "method",
            "block",
            postgresql_include=list(SELECTION_COLUMNS),
        ),
        # The few cross-checked rows, found without scanning a run's layers.
        Index(
            "ix_layer_metric_crosscheck_diff",
            "checkpoint_id",
            "crosscheck_diff",
            postgresql_where=text("crosscheck_diff IS NOT NULL"),
            sqlite_where=text("crosscheck_diff IS NOT NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoint.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(32), default="other")
    block: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(String(32))
    method: Mapped[str] = mapped_column(String(32), default="ww")
    fit_status: Mapped[str] = mapped_column(String(32))
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    rows: Mapped[int | None] = mapped_column(Integer)
    cols: Mapped[int | None] = mapped_column(Integer)
    num_evals: Mapped[int | None] = mapped_column(Integer)
    lambda_max: Mapped[float | None] = mapped_column(Float)
    alpha: Mapped[float | None] = mapped_column(Float)
    alpha_weighted: Mapped[float | None] = mapped_column(Float)
    log_norm: Mapped[float | None] = mapped_column(Float)
    log_spectral_norm: Mapped[float | None] = mapped_column(Float)
    stable_rank: Mapped[float | None] = mapped_column(Float)
    log_alpha_norm: Mapped[float | None] = mapped_column(Float)
    D: Mapped[float | None] = mapped_column(Float)
    # xmin/xmax are PostgreSQL system column names: stored under a prefix.
    xmin: Mapped[float | None] = mapped_column("pl_xmin", Float)
    xmax: Mapped[float | None] = mapped_column("pl_xmax", Float)
    num_pl_spikes: Mapped[int | None] = mapped_column(Integer)
    sigma: Mapped[float | None] = mapped_column(Float)
    entropy: Mapped[float | None] = mapped_column(Float)
    matrix_rank: Mapped[int | None] = mapped_column(Integer)
    rank_loss: Mapped[int | None] = mapped_column(Integer)
    mp_bulk_max: Mapped[float | None] = mapped_column(Float)
    mp_sigma: Mapped[float | None] = mapped_column(Float)
    # weightwatcher 0.7.7's numbers under its names (its MP fit of the ESD, its shuffle
    # distance); alphawatch's own measures beside them (docs/SPECTRAL.md, "Two MP fits").
    num_spikes: Mapped[int | None] = mapped_column(Integer)
    mp_softrank: Mapped[float | None] = mapped_column(Float)
    edge_spikes: Mapped[int | None] = mapped_column(Integer)
    edge_softrank: Mapped[float | None] = mapped_column(Float)
    num_traps: Mapped[int | None] = mapped_column(Integer)
    rand_distance: Mapped[float | None] = mapped_column(Float)
    shuffle_traps: Mapped[int | None] = mapped_column(Integer)
    shuffle_distance: Mapped[float | None] = mapped_column(Float)
    max_rand_eval: Mapped[float | None] = mapped_column(Float)
    mean_spike: Mapped[bool] = mapped_column(Boolean, default=False)
    alpha_delta: Mapped[float | None] = mapped_column(Float)
    correlation_trap: Mapped[bool] = mapped_column(Boolean, default=False)
    rank_collapse: Mapped[bool] = mapped_column(Boolean, default=False)
    near_random: Mapped[bool] = mapped_column(Boolean, default=False)
    over_trained: Mapped[bool] = mapped_column(Boolean, default=False)
    under_trained: Mapped[bool] = mapped_column(Boolean, default=False)
    warning: Mapped[str | None] = mapped_column(String(32))
    elapsed_ms: Mapped[float | None] = mapped_column(Float)
    distance_from_init: Mapped[float | None] = mapped_column(Float)
    # Is the tail a power law? powerlaw's likelihood-ratio tests on the fitted tail (R > 0
    # favours the power law), the truncated power law's fit, and clip_xmax's clipped fingers.
    num_fingers: Mapped[int | None] = mapped_column(Integer)
    tpl_alpha: Mapped[float | None] = mapped_column(Float)
    tpl_lambda: Mapped[float | None] = mapped_column(Float)
    pl_vs_tpl_R: Mapped[float | None] = mapped_column(Float)
    pl_vs_tpl_p: Mapped[float | None] = mapped_column(Float)
    pl_vs_lognormal_R: Mapped[float | None] = mapped_column(Float)
    pl_vs_lognormal_p: Mapped[float | None] = mapped_column(Float)
    # Relative difference |alpha - weightwatcher's| / weightwatcher's, for the layers the live
    # cross-check re-analysed (settings.crosscheck.share); None for the others.
    crosscheck_diff: Mapped[float | None] = mapped_column(Float)
    # Layer distances from the same layer of the checkpoint before by step (change_ref_step):
    # ‖ΔW‖_F/‖W‖_F, ‖ΔW‖₂/‖W‖₂ and the overlap of the top-k singular subspaces (k =
    # overlap_k). On the weight rows of runs analysed with ALPHAWATCH_DELTAS prev or distances;
    # kept beside alpha so the distance heatmap is the alpha heatmap's query on another column.
    change_fro: Mapped[float | None] = mapped_column(Float)
    change_spectral: Mapped[float | None] = mapped_column(Float)
    subspace_overlap: Mapped[float | None] = mapped_column(Float)
    overlap_k: Mapped[int | None] = mapped_column(Integer)
    change_ref_step: Mapped[int | None] = mapped_column(BigInteger)
    # JSON: which rows and columns carry a correlation trap (W's top singular vectors: their
    # participation ratios and heaviest neurons); NULL for layers without a trap.
    trap_localisation: Mapped[str | None] = mapped_column(Text)


class KeptStatistic:
    """The columns of a kept robust statistic (``aggregates._kept`` makes them), shared by the
    whole-model and the per-block rows."""

    # The rule parameters the row was computed with: a server configured otherwise recomputes.
    alpha_max: Mapped[float] = mapped_column(Float)
    mad_k: Mapped[float] = mapped_column(Float)
    n_used: Mapped[int] = mapped_column(Integer)
    n_excluded: Mapped[int] = mapped_column(Integer)
    excluded: Mapped[str] = mapped_column(Text, default="{}")  # JSON {reason: count}
    median: Mapped[float | None] = mapped_column(Float)
    mean: Mapped[float | None] = mapped_column(Float)
    trimmed_mean: Mapped[float | None] = mapped_column(Float)
    p10: Mapped[float | None] = mapped_column(Float)
    p25: Mapped[float | None] = mapped_column(Float)
    p75: Mapped[float | None] = mapped_column(Float)
    p90: Mapped[float | None] = mapped_column(Float)
    iqr: Mapped[float | None] = mapped_column(Float)


class CheckpointStat(KeptStatistic, Base):
    """A robust statistic of one metric over the layers of one checkpoint, kept at write time.

    Written by ``results.complete`` in the same transaction as the layer rows, so a trend over a
    long run reads one row per checkpoint instead of every layer. Filters that are not kept here
    (other kind sets, block ranges, other MAD factors) are computed from the layer rows on request.
    """

    __tablename__ = "checkpoint_stat"
    __table_args__ = (
        UniqueConstraint(
            "checkpoint_id",
            "method",
            "metric",
            "filter",
            "outliers",
            "kinds",
            name="uq_checkpoint_stat_key",
        ),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoint.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(32))
    metric: Mapped[str] = mapped_column(String(64))
    filter: Mapped[str] = mapped_column(String(16))
    outliers: Mapped[str] = mapped_column(String(16))
    # Layer kinds the statistic is over, sorted and comma-joined; "" for every layer.
    kinds: Mapped[str] = mapped_column(String(200))


class BlockStat(KeptStatistic, Base):
    """A robust statistic of alpha over the layers of one block of one checkpoint, kept at write
    time like :class:`CheckpointStat`.

    One row per block, variant (weights, gradients, nested widths), kind set (every kind, the
    attention and the MLP group), filter and outlier rule, for every block the selection holds a
    layer of: a per-block trend reads one row per block and checkpoint instead of its layers.
    Written in the same transaction as the layer rows (``results.complete``); other selections
    are computed from the layer rows on request.
    """

    __tablename__ = "block_stat"
    __table_args__ = (
        # Key columns in read order: one selection's blocks of one checkpoint lie side by side,
        # and a block range is a range of the last column.
        UniqueConstraint(
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
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoint.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(32))
    variant: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(64))
    filter: Mapped[str] = mapped_column(String(16))
    outliers: Mapped[str] = mapped_column(String(16))
    kinds: Mapped[str] = mapped_column(String(200))
    block: Mapped[int] = mapped_column(Integer)


class Spectrum(Base):
    """Eigenvalues of a layer (float32 bytes) for ESD plots and re-fits."""

    __tablename__ = "spectrum"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer_metric_id: Mapped[int] = mapped_column(
        ForeignKey("layer_metric.id", ondelete="CASCADE"), unique=True
    )
    evals: Mapped[bytes | None] = mapped_column(LargeBinary)
    rand_evals: Mapped[bytes | None] = mapped_column(LargeBinary)


class AnalysisJob(Base):
    """The queue entry of a checkpoint: who holds it, until when, how often it was tried."""

    __tablename__ = "analysis_job"
    __table_args__ = (
        Index("ix_analysis_job_status_lease", "status", "lease_expires_at"),
        CheckConstraint(_one_of(JobStatus), name="status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("checkpoint.id", ondelete="CASCADE"), unique=True
    )
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Its place in its run's backlog, lowest first (queue.reorder): the newest step, then
    # coarse to fine, so the trend is whole at low resolution early and sharpens.
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AlertStatus(StrEnum):
    """Where the delivery of one gate alert to the webhook stands."""

    PENDING = "pending"  # waiting for its first or next attempt (next_attempt_at)
    SENDING = "sending"  # a worker's delivery thread holds it until lease_expires_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: attempts spent, or an answer that retrying cannot change
    # Never sent (again): a newer verdict of the run replaced it before it went out, or the
    # run's verdict is back to the one the receiver was last told (last_error says which).
    SUPERSEDED = "superseded"


class RunGate(Base):
    """A run's stored gate rules and the last verdict the worker recorded with them."""

    __tablename__ = "run_gate"
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), primary_key=True)
    # JSON {rule: value} set by PUT gate-rules; a rule not named takes the server's default,
    # a rule named with null is switched off for this run.
    rules: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    rules_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The last verdict: None until the gate was first evaluated after an analysis.
    passed: Mapped[bool | None] = mapped_column(Boolean)
    step: Mapped[int | None] = mapped_column(BigInteger)
    violations: Mapped[str | None] = mapped_column(Text)  # JSON list, as the gate answers
    evaluated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Alert(Base):
    """A change of a run's gate verdict, and its delivery to the webhook (the outbox)."""

    __tablename__ = "alert"
    __table_args__ = (
        Index("ix_alert_status_next_attempt_at", "status", "next_attempt_at"),
        CheckConstraint(_one_of(AlertStatus), name="status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("run.id", ondelete="CASCADE"), index=True)
    step: Mapped[int | None] = mapped_column(BigInteger)
    passed: Mapped[bool] = mapped_column(Boolean)
    # The verdict before this one; None when this is the run's first.
    previous: Mapped[bool | None] = mapped_column(Boolean)
    payload: Mapped[str] = mapped_column(Text)  # the JSON body POSTed, exactly
    status: Mapped[str] = mapped_column(String(16), default=AlertStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    # When its latest attempt began: a run's next alert waits ALPHAWATCH_ALERTS__MIN_INTERVAL_S
    # after it, so a flapping verdict cannot flood the receiver.
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiToken(Base):
    """An API token, stored as its SHA-256 hash only."""

    __tablename__ = "api_token"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # read | write | admin (``tokens.TokenScope``); tokens made before scopes existed are admin.
    scope: Mapped[str] = mapped_column(String(16), default="write", server_default="admin")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


LAYER_COLUMNS = frozenset(a.key for a in LayerMetric.__mapper__.column_attrs) - {
    "id",
    "checkpoint_id",
}


class ApiAnswer(Base):
    """A read answer of the API kept for every API process: the result cache's shared tier.

    ``token`` is the payload of the last result notification the process that computed it had
    received; a process serves the row only while its own last notification is the same one
    (service/api/cache.py). UNLOGGED on PostgreSQL (migration 0016): a cache, not data.
    """

    __tablename__ = "api_answer"
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    token: Mapped[str] = mapped_column(String(128))
    body: Mapped[bytes] = mapped_column(LargeBinary)
