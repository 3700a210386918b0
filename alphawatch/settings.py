"""Settings for every alphawatch process, read from ``ALPHAWATCH_*`` environment variables.

Settings are built in ``main()`` or the app factory, never at import time, so tests and
embedding applications can pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./alphawatch.db"


class TrustSettings(BaseModel):
    """Thresholds of the trust verdict; the API reports them so users see what was applied."""

    min_evals: int = Field(10, ge=1, description="fewer eigenvalues than this: too_few_evals")
    min_tail: int = Field(10, ge=2, description="power-law tail shorter than this: tail_too_short")
    max_ks_distance: float = Field(0.1, gt=0, le=1, description="KS distance D above: poor_fit")
    alpha_min: float = Field(1.0, description="alpha at or below this: alpha_out_of_range")
    alpha_max: float = Field(8.0, description="alpha above this: alpha_out_of_range")
    max_alpha_delta: float = Field(
        0.5, gt=0, description="alpha moving more than this under bootstrap: unstable"
    )
    rank_loss_fraction: float = Field(
        0.1, gt=0, le=1, description="share of zero singular values that flags rank collapse"
    )
    over_trained_below: float = Field(2.0, description="weightwatcher's over-trained label")
    under_trained_above: float = Field(6.0, description="weightwatcher's under-trained label")
    trap_seed: int = Field(0, description="seed of the shuffle used to find correlation traps")
    bootstrap_samples: int = Field(32, ge=0, description="tail bootstrap resamples for stability")


class Settings(BaseSettings):
    """All settings of alphawatch. Environment: ``ALPHAWATCH_<NAME>``, nested with ``__``."""

    model_config = SettingsConfigDict(
        env_prefix="ALPHAWATCH_", env_nested_delimiter="__", extra="ignore"
    )

    database_url: str = DEFAULT_DATABASE_URL
    allowed_roots: list[Path] = Field(default_factory=list)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fit_method: str = "ww"
    poll_interval_s: float = Field(5.0, gt=0)
    settle_s: float = Field(30.0, ge=0, description="size/mtime stable this long: complete")
    lease_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    job_timeout_s: float = Field(
        4 * 3600.0, gt=0, description="wall-clock budget of one checkpoint's analysis"
    )
    job_memory_mb: float = Field(
        0, ge=0, description="resident memory budget of one analysis (MiB; 0: 3/4 of the RAM)"
    )
    read_requires_token: bool = False
    api_cache_mb: float = Field(
        256, ge=0, description="MiB of read answers kept per API process (PostgreSQL only; 0: off)"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    trust: TrustSettings = Field(default_factory=TrustSettings)  # type: ignore[arg-type]

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

    @field_validator("allowed_roots")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in value]
