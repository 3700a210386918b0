"""Settings come from ALPHAWATCH_* variables, are normalised, and are built only on demand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alphawatch.cli import build_parser
from alphawatch.cli.common import settings_of
from alphawatch.settings import DEFAULT_DATABASE_URL, Settings


def test_defaults_are_the_embedded_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ALPHAWATCH_DATABASE_URL", "ALPHAWATCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.device == "auto"
    assert settings.trust.alpha_max == 8.0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_url_is_normalised(given: str, expected: str) -> None:
    assert Settings(database_url=given).database_url == expected


def test_environment_and_nested_thresholds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALPHAWATCH_TRUST__MIN_TAIL", "17")
    monkeypatch.setenv("ALPHAWATCH_ALLOWED_ROOTS", f'["{tmp_path}/runs/../runs"]')
    monkeypatch.setenv("ALPHAWATCH_DEVICE", "cpu")
    settings = Settings()
    assert settings.trust.min_tail == 17
    assert settings.allowed_roots == [(tmp_path / "runs").resolve()]
    assert settings.device == "cpu"


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="device"):
        Settings(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="poll_interval_s"):
        Settings(poll_interval_s=0)


def test_importing_the_packages_builds_no_settings(tmp_path: Path) -> None:
    # A bad environment must not break imports: settings are built in main()/the app factory.
    code = (
        "import alphawatch.settings, alphawatch.service.api, alphawatch.service.db, "
        "alphawatch.workers.watcher, alphawatch.cli"
    )
    env = {
        "ALPHAWATCH_DEVICE": "not-a-device",
        "ALPHAWATCH_API_THREADS": "not-a-number",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_keep_up_is_off_by_default_and_a_bound_of_at_least_three(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ALPHAWATCH_KEEP_UP", raising=False)
    assert Settings().keep_up == 0
    monkeypatch.setenv("ALPHAWATCH_KEEP_UP", "8")
    assert Settings().keep_up == 8
    for bad in ("2", "-1", "eight"):
        monkeypatch.setenv("ALPHAWATCH_KEEP_UP", bad)
        with pytest.raises(ValueError, match="keep_up"):
            Settings()


def test_keep_up_on_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALPHAWATCH_KEEP_UP", "8")
    parser = build_parser()
    assert settings_of(parser.parse_args(["watch", "--keep-up", "16"])).keep_up == 16
    assert settings_of(parser.parse_args(["watch", "--keep-up", "0"])).keep_up == 0
    assert settings_of(parser.parse_args(["watch"])).keep_up == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "/runs", "--keep-up", "2"])
