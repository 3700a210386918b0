"""What an app applies when it starts: ALPHAWATCH_API_THREADS (a setting, read when the app is
built), and its process's heap left out of later garbage collections."""

from __future__ import annotations

import subprocess
import sys

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


def test_a_started_app_leaves_the_heap_it_was_built_with_out_of_collections(
    sqlite_url: str,
) -> None:
    # In a process of its own: an app started by an earlier test froze this one's already.
    code = f"""
import gc
from fastapi.testclient import TestClient
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
app = create_app(Settings(database_url={sqlite_url!r}))
print(gc.get_freeze_count())
with TestClient(app) as client:
    assert client.get("/health").status_code == 200
    print(gc.get_freeze_count())
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    before, after = (int(line) for line in done.stdout.split())
    assert before == 0
    assert after > 10_000  # the imported libraries, the app and its routes
