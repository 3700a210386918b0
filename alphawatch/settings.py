"""Settings for every alphawatch process, read from ``ALPHAWATCH_*`` environment variables.

Settings are built in ``main()`` or the app factory, never at import time, so tests and
embedding applications can pass their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from alphawatch.trust import Thresholds

DEFAULT_DATABASE_URL = "sqlite:///./alphawatch.db"


class Settings(BaseSettings):
    """All settings of alphawatch. Environment: ``ALPHAWATCH_<NAME>``, nested with ``__``."""

    model_config = SettingsConfigDict(
        env_prefix="ALPHAWATCH_", env_nested_delimiter="__", extra="ignore"
    )

    database_url: str = DEFAULT_DATABASE_URL
    allowed_roots: list[Path] = Field(default_factory=list)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fit_method: str = "ww"
    check_traps: bool = Field(
        True, description="look for correlation traps (a second spectrum, of the shuffled W)"
    )
    analysis_workers: int = Field(
        0, ge=0, description="matrices analysed at once on a CPU, one BLAS thread share each "
        "(0: one per core, at most 4)"
    )
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
    read_requires_token: bool = Field(
        False, description="reads (and /metrics) need a token of any scope, as writes always do"
    )
    max_body_bytes: int = Field(
        2**20, ge=1024, description="largest request body accepted (413 above it), 1 MiB default"
    )
    api_cache_mb: float = Field(
        256, ge=0, description="MiB of read answers kept per API process (PostgreSQL only; 0: off)"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    trust: Thresholds = Field(default_factory=Thresholds)

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
