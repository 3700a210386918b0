"""Settings for every alphawatch process, read from ``ALPHAWATCH_*`` environment variables.

Settings are built in ``main()`` or the app factory, never at import time, so tests and
embedding applications can pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from alphawatch.gate_rules import GateRules
from alphawatch.locations import object_url, split_roots
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import DEFAULT_FIT_METHOD, FitMethod

DEFAULT_DATABASE_URL = "sqlite:///./alphawatch.db"


class ExportSettings(BaseModel):
    """Trackers the worker exports each analysed checkpoint to (``ALPHAWATCH_EXPORT__*``).

    Nothing is exported unless a target is named. A tracker that fails is logged and skipped:
    it never fails a job or stops the worker.
    """

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (sqlite:///mlflow.db, http://mlflow:5000)"
    )
    mlflow_experiment: str = Field("alphawatch", min_length=1, description="MLflow experiment")
    tensorboard_logdir: Path | None = Field(
        None, description="TensorBoard folder; each run writes <logdir>/<run name>/"
    )
    wandb_project: str | None = Field(None, description="Weights & Biases project")
    wandb_entity: str | None = Field(None, description="W&B entity (default: the user's)")
    wandb_dir: Path | None = Field(None, description="where W&B keeps its files (offline too)")
    layers: bool = Field(False, description="export every layer's alpha, not only the model's")


class AlertSettings(BaseModel):
    """Where and how gate alerts are delivered (``ALPHAWATCH_ALERTS__<NAME>``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    webhook_url: str | None = Field(
        None, description="http(s) URL that gate verdict changes are POSTed to; none: no alerts"
    )
    timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="the whole of one delivery attempt: connecting, sending "
        "and reading the answer (a receiver that trickles its answer is cut off)",
    )
    max_attempts: int = Field(8, ge=1, le=100, description="attempts before a delivery fails")
    backoff_s: float = Field(
        2.0, gt=0, description="wait before the second attempt; doubled after each failure"
    )
    backoff_max_s: float = Field(600.0, gt=0, description="longest wait between two attempts")
    poll_s: float = Field(2.0, gt=0, description="how often a worker looks for due deliveries")
    min_interval_s: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="least time between two alerts of one run; a verdict "
        "that changes again meanwhile replaces the waiting alert (the latest is always sent)",
    )
    senders: int = Field(
        4,
        ge=1,
        le=32,
        description="deliveries a worker makes at once (one slow receiver or "
        "run holds one of them)",
    )

    @field_validator("webhook_url")
    @classmethod
    def _http_only(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        parts = urlsplit(value)
        # Only plain HTTP(S) to a named host: no file:, ftp: or other scheme a URL opener
        # would follow, and nothing that is not a network request.
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the alert webhook URL must be http:// or https:// with a host")
        return value


class CrossCheck(BaseModel):
    """The live cross-check: a share of layers re-analysed with weightwatcher itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of layers the worker re-analyses with weightwatcher (needs the "
        "crosscheck extra); chosen by a hash of checkpoint and layer name; 0: off",
    )
    tolerance: float = Field(
        1e-3, gt=0, description="relative alpha difference above which a layer is flagged"
    )


class Settings(BaseSettings):
    """All settings of alphawatch. Environment: ``ALPHAWATCH_<NAME>``, nested with ``__``."""

    model_config = SettingsConfigDict(
        env_prefix="ALPHAWATCH_", env_nested_delimiter="__", extra="ignore"
    )

    database_url: str = DEFAULT_DATABASE_URL
    allowed_roots: list[Path] = Field(default_factory=list)
    # The URL prefixes among ALPHAWATCH_ALLOWED_ROOTS (s3://bucket/team, gs://…), normalised;
    # split off before the local roots are resolved (alphawatch.locations).
    allowed_url_roots: list[str] = Field(default_factory=list)
    spool_max_mb: float = Field(
        64 * 1024,
        gt=0,
        description="the most MB one analysis of an object-store checkpoint downloads into its "
        "spool (torch pickles, DCP); safetensors are read by ranges and never spooled",
    )
    base_cache_mb: float = Field(
        16 * 1024,
        ge=0,
        description="the most MB a worker keeps on disk of the base checkpoints it compares "
        "with (runs in object storage, any format, downloaded once, not per analysis: deltas "
        "init the first checkpoint; prev/distances a run's newest checkpoint, the next one's "
        "base); a larger base is read by ranges (or spooled) at each analysis; 0: off",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fit_method: FitMethod = Field(DEFAULT_FIT_METHOD, description="power-law fit method")
    check_traps: bool = Field(
        True, description="look for correlation traps (a second spectrum, of the shuffled W)"
    )
    analysis_workers: int = Field(
        0,
        ge=0,
        description="matrices analysed at once on a CPU, one BLAS thread share each "
        "(0: one per core, at most 4)",
    )
    poll_interval_s: float = Field(5.0, gt=0)
    settle_s: float = Field(30.0, ge=0, description="size/mtime stable this long: complete")
    rewrite_checks_per_poll: int = Field(
        200,
        ge=0,
        description="settled checkpoints re-fingerprinted per poll, round-robin, to "
        "see files rewritten in place (0: never)",
    )
    lease_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    stop_grace_s: float = Field(
        20.0,
        ge=0,
        description="told to stop (SIGTERM), how long a worker goes on with the job in hand "
        "before it stops the analysis and gives the job back to the queue (0: at once)",
    )
    max_attempts: int = Field(3, ge=1)
    job_timeout_s: float = Field(
        4 * 3600.0, gt=0, description="wall-clock budget of one checkpoint's analysis"
    )
    job_memory_mb: float = Field(
        0, ge=0, description="resident memory budget of one analysis (MiB; 0: 3/4 of the RAM)"
    )
    # One number, not a switch: the backlog is what an operator already watches and alerts on
    # (alphawatch_queue_depth, each run's lag_checkpoints), and a count needs no forecast of
    # analysis time, which a time bound would.
    keep_up: int = Field(
        0,
        ge=0,
        le=10000,
        description="the keep-up policy for fleets that cannot analyse every checkpoint "
        "(CPU-only): at most this many queued checkpoints per run, the newest and the "
        "coarse-to-fine backbone first; the rest are marked skipped (0: off, every "
        "checkpoint is analysed, and skipped ones are queued again; else at least 3)",
    )
    optimizer_state: bool = Field(
        False,
        description="also analyse Adam's exp_avg of each weight matrix (<layer>@exp_avg "
        "rows) from the optimizer state saved beside the weights",
    )
    # NoDecode: the environment's "1024,2048" is split by the validator, not parsed as JSON.
    nested_widths: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="MLP widths k analysed as nested sub-models (<layer>@w<k> rows); empty: "
        "the widths the model's config.json names under nested_widths, if any",
    )
    # NoDecode: the environment's "init,prev" is split by the validator, not parsed as JSON.
    deltas: Annotated[list[Literal["init", "prev", "distances"]], NoDecode] = Field(
        default_factory=list,
        description="update spectra and distances against other checkpoints: init "
        "(<layer>@delta_init rows, against the run's first checkpoint), prev (<layer>@delta_prev "
        "rows and layer distances, against the checkpoint before by step), distances (the layer "
        "distances alone); each reads a second checkpoint",
    )
    read_requires_token: bool = Field(
        False, description="reads (and /metrics) need a token of any scope, as writes always do"
    )
    max_body_bytes: int = Field(
        2**20, ge=1024, description="largest request body accepted (413 above it), 1 MiB default"
    )
    api_cache_mb: float = Field(
        256, ge=0, description="MiB of read answers kept per API process (PostgreSQL only; 0: off)"
    )
    gate_wait_max_s: float = Field(
        60,
        ge=0,
        le=60,
        description="longest a gate request's wait_s is honoured (below the query's bound of 60)",
    )
    # Route handlers are sync (SQLAlchemy sessions) and run on anyio's thread pool. Its default
    # of 40 threads lets 40 CPU-bound handlers fight for the GIL at once, which on a small
    # machine stretches every request instead of finishing some; a few threads keep latency
    # bounded and still overlap database waits.
    api_threads: int = Field(
        6,
        ge=1,
        le=1000,
        description="threads of an API process that run route handlers (anyio's default is 40)",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # NoDecode: the environment's "a.example,127.0.0.1" is split by the validator.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host headers the API answers, a guard against DNS rebinding (empty: the "
        "bound host, localhost, 127.0.0.1 and [::1]; '*': any host)",
    )
    trust: Thresholds = Field(default_factory=Thresholds)
    export: ExportSettings = Field(default_factory=ExportSettings)
    # min_alpha / max_alpha left unset take the trust thresholds' over-/under-trained labels.
    gate: GateRules = Field(default_factory=GateRules)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    crosscheck: CrossCheck = Field(default_factory=CrossCheck)

    @model_validator(mode="after")
    def _gate_band_from_trust(self) -> Self:
        band: dict[str, float] = {}
        if "min_alpha" not in self.gate.model_fields_set:
            band["min_alpha"] = self.trust.over_trained_below
        if "max_alpha" not in self.gate.model_fields_set:
            band["max_alpha"] = self.trust.under_trained_above
        if band:
            self.gate = self.gate.merged(band)
        return self

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str) -> str:
        # Users paste URLs from Heroku-style tools and docker env files; SQLAlchemy needs the
        # driver named, and psycopg 3 is the one we ship.
        if value.startswith("postgres://"):
            value = "postgresql://" + value[len("postgres://") :]
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value[len("postgresql://") :]
        return value

    @field_validator("keep_up")
    @classmethod
    def _keep_up_keeps_the_ends(cls, value: int) -> int:
        # Fewer than 3 could pass over the first step or the middle of a run's backlog.
        if 0 < value < 3:
            raise ValueError(
                "keep_up is 0 (off) or at least 3: the newest, the first and the middle "
                "checkpoint of a backlog are always analysed"
            )
        return value

    @field_validator("nested_widths", mode="before")
    @classmethod
    def _parse_widths(cls, value: object) -> object:
        # "1024,2048" from the environment or the command line, besides a JSON list.
        if isinstance(value, str):
            return [int(w) for w in value.strip().strip("[]").split(",") if w.strip()]
        return value

    @field_validator("deltas", mode="before")
    @classmethod
    def _split_deltas(cls, value: object) -> object:
        # "init,prev" from the environment or the command line, besides a JSON list.
        if isinstance(value, str):
            return [d.strip() for d in value.strip().strip("[]").split(",") if d.strip()]
        return value

    @field_validator("deltas")
    @classmethod
    def _unique_deltas(cls, value: list[str]) -> list[str]:
        return sorted(set(value))

    @field_validator("nested_widths")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if any(w <= 0 for w in value):
            raise ValueError("nested widths must be positive integers")
        return sorted(set(value))

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [h.strip() for h in value.split(",") if h.strip()]
        return value

    @model_validator(mode="before")
    @classmethod
    def _split_url_roots(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        roots = data.get("allowed_roots")
        if isinstance(roots, list | tuple):
            local, urls = split_roots(roots)
            if urls:
                given = list(data.get("allowed_url_roots") or [])
                data = {
                    **data,
                    "allowed_roots": local,
                    "allowed_url_roots": list(dict.fromkeys([*given, *urls])),
                }
        return data

    @field_validator("allowed_url_roots")
    @classmethod
    def _normalise_url_roots(cls, value: list[str]) -> list[str]:
        return [str(object_url(v)) for v in value]

    @field_validator("allowed_roots")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in value]
