"""The API answers only the Host names it is known by: a guard against DNS rebinding.

A page on evil.example that rebinds its name to 127.0.0.1 reaches the API from the visitor's
browser with ``Host: evil.example``; that request is refused with 400 before any route runs.
Real servers on 127.0.0.1: uvicorn in a thread, and ``alphawatch serve`` in its own process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from alphawatch.service.api import create_app
from alphawatch.service.api.hosts import AllowedHosts, allowed_hosts, host_of
from alphawatch.settings import Settings
from tests.live import serve
from tests.pg import free_port

ROOT = Path(__file__).resolve().parents[2]


def _get(base: str, host: str | None, path: str = "/api/v1/runs") -> httpx.Response:
    headers = {"Host": host} if host is not None else {}
    return httpx.get(f"{base}{path}", headers=headers, timeout=30)


def _refused(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert "ALPHAWATCH_ALLOWED_HOSTS" in detail and "DNS rebinding" in detail


def test_a_server_bound_to_loopback_answers_loopback_names_only(sqlite_url: str) -> None:
    app = create_app(Settings(database_url=sqlite_url), bound_host="127.0.0.1")
    with serve(app) as base:
        port = base.rsplit(":", 1)[1]
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "localhost",
            f"[::1]:{port}",
            f"LOCALHOST.:{port}",
        ):
            assert _get(base, host).status_code == 200, host
        for host in (
            f"evil.example:{port}",
            "evil.example",
            f"127.0.0.1.evil.example:{port}",
            "[::1",
            "localhost:http",
            "a b",
            "",
        ):
            _refused(_get(base, host))
        # Writes are refused before their token is even looked at, and the static dashboard too.
        _refused(
            httpx.post(
                f"{base}/api/v1/runs",
                headers={"Host": "evil.example"},
                json={"name": "x", "path": "/x"},
                timeout=30,
            )
        )
        _refused(_get(base, "evil.example", "/"))


def test_no_host_header_is_refused(sqlite_url: str) -> None:
    app = create_app(Settings(database_url=sqlite_url), bound_host="127.0.0.1")
    with serve(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"GET /api/v1/runs HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"ALPHAWATCH_ALLOWED_HOSTS" in answer


def test_the_setting_names_the_hosts_and_star_answers_any(sqlite_url: str) -> None:
    named = Settings(database_url=sqlite_url, allowed_hosts="dash.example, 10.0.0.5")
    assert named.allowed_hosts == ["dash.example", "10.0.0.5"]
    with serve(create_app(named, bound_host="127.0.0.1")) as base:
        assert _get(base, "dash.example:8000").status_code == 200
        assert _get(base, "10.0.0.5").status_code == 200
        _refused(_get(base, "127.0.0.1"))  # the list replaces the default
    anything = Settings(database_url=sqlite_url, allowed_hosts="*")
    with serve(create_app(anything, bound_host="127.0.0.1")) as base:
        assert _get(base, "evil.example").status_code == 200


def test_alphawatch_serve_passes_its_bound_host(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "ALPHAWATCH_ALLOWED_HOSTS"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "alphawatch",
                "serve",
                "--db",
                f"sqlite:///{tmp_path / 's.db'}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _get(base, None, "/api/v1/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        _refused(_get(base, "evil.example", "/api/v1/health"))
        assert _get(base, f"localhost:{port}", "/api/v1/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("bound", "allowed", "refused"),
    [
        ("127.0.0.1", ["127.0.0.1", "localhost:1", "[::1]"], ["10.0.0.5", "evil.example"]),
        ("dash.internal", ["dash.internal:8000", "localhost"], ["evil.example", "10.0.0.5"]),
        # Every interface: any address (an address cannot be rebound), names only the loopback's.
        ("0.0.0.0", ["10.0.0.5:8000", "[fe80::1]:80", "localhost"], ["evil.example", "api"]),
        ("::", ["192.168.1.2", "localhost"], ["evil.example"]),
    ],
)
def test_the_default_follows_the_bound_host(
    bound: str, allowed: list[str], refused: list[str]
) -> None:
    hosts = allowed_hosts([], bound)
    assert isinstance(hosts, AllowedHosts)
    assert all(hosts.allows(h) for h in allowed)
    assert not any(hosts.allows(h) for h in refused)
    assert not hosts.allows(None)


def test_without_a_bound_host_or_setting_nothing_is_checked() -> None:
    # An app mounted in one's own ASGI server, or a test client: the setting decides.
    assert allowed_hosts([], None) is None
    assert allowed_hosts(["*"], "127.0.0.1") is None
    assert host_of("[::1]:8000") == "::1" and host_of("Example.COM.:80") == "example.com"
