"""ALPHAWATCH_API_THREADS is a setting: read when the app is built, applied when it starts."""

from __future__ import annotations

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.settings import Settings


def _route_threads(client: TestClient) -> int:
    # The limiter belongs to the app's event loop: read it there.
    portal = client.portal
    assert portal is not None
    return int(portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens))


def test_the_environment_sizes_the_route_threads_of_an_app_built_later(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set after every module is imported: only settings built by the app factory can see it.
    monkeypatch.setenv("ALPHAWATCH_API_THREADS", "3")
    monkeypatch.setenv("ALPHAWATCH_DATABASE_URL", sqlite_url)
    settings = Settings()
    assert settings.api_threads == 3
    with TestClient(create_app(settings)) as client:
        assert _route_threads(client) == 3
        assert client.get("/health").status_code == 200


def test_settings_passed_in_size_the_route_threads(sqlite_url: str) -> None:
    with TestClient(create_app(Settings(database_url=sqlite_url, api_threads=2))) as client:
        assert _route_threads(client) == 2
    with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
        assert _route_threads(client) == Settings.model_fields["api_threads"].default


def test_bad_thread_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="api_threads"):
        Settings(api_threads=0)
