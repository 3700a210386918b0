"""The API over real HTTP (uvicorn on loopback, real PostgreSQL): what a client and an attacker see.

Read-after-write on one keep-alive connection, hostile paths and queries, request sizes, and
token scopes, expiry and revocation.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from alphawatch.service.api import create_app
from alphawatch.service.api.cache import ResultCache
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token, revoke_token
from alphawatch.settings import Settings
from tests.factories import random_run
from tests.live import serve
from tests.pg import free_port

ROOT = Path(__file__).resolve().parents[2]


def _token(url: str, name: str, scope: TokenScope, days: float | None = None) -> str:
    with session_scope(make_engine(url)) as session:
        return create_token(session, name=name, scope=scope, expires_in_days=days)


class Client:
    """One HTTP/1.1 keep-alive connection, raw enough to send what httpx would refuse."""

    def __init__(self, base: str, token: str | None = None) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.token = token
        self.local_ports: set[int] = set()

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        raw = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=raw, headers=headers)
        assert self.conn.sock is not None
        self.local_ports.add(self.conn.sock.getsockname()[1])
        response = self.conn.getresponse()
        data = response.read()
        kind = response.getheader("content-type", "")
        parsed = json.loads(data) if data and "json" in kind else data.decode()
        return response.status, parsed, {k.lower(): v for k, v in response.getheaders()}

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def site(db_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """(base URL, database URL, allowed root) of a live server over a filled database."""
    random_run(db_url)
    root = tmp_path / "root"
    (root / "run-dir").mkdir(parents=True)
    app = create_app(Settings(database_url=db_url, allowed_roots=[root]))
    with serve(app) as base:
        cache: ResultCache | None = app.state.cache
        assert cache is None or cache.wait_live(10)
        yield base, db_url, root


def test_writes_are_visible_to_the_next_request_on_the_same_connection(
    site: tuple[str, str, Path],
) -> None:
    base, url, root = site
    client = Client(base, _token(url, "ops", TokenScope.ADMIN))
    body = {"name": "fresh", "path": str(root / "run-dir")}
    for i in range(40):
        status, created, _ = client.request("POST", "/api/v1/runs", body)
        assert status == 201, (i, created)
        run = f"/api/v1/runs/{created['id']}"
        # RFC 3339: a zone, on SQLite too (it hands timestamps back without one).
        assert datetime.fromisoformat(created["created_at"]).tzinfo is not None
        assert client.request("GET", run)[0] == 200, i
        # Read twice: the second answer may come from the result cache; it must not outlive
        # the run deleted below.
        assert client.request("GET", f"{run}/trend")[1]["points"] == []
        assert client.request("GET", f"{run}/trend")[1]["points"] == []
        assert created["id"] in [r["id"] for r in client.request("GET", "/api/v1/runs")[1]["runs"]]
        assert client.request("DELETE", run)[0] == 204, i
        status, gone, _ = client.request("GET", run)
        assert status == 404 and "not found" in gone["detail"], (i, gone)
        assert client.request("GET", f"{run}/trend")[0] == 404, i
        assert created["id"] not in [
            r["id"] for r in client.request("GET", "/api/v1/runs")[1]["runs"]
        ]
    assert len(client.local_ports) == 1, "the connection was not kept alive"
    client.close()


def test_hostile_paths_and_queries_get_a_4xx_with_a_message(
    site: tuple[str, str, Path], tmp_path: Path
) -> None:
    base, url, root = site
    (root / "loop").symlink_to(root / "loop")
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    (root / "file").write_text("not a directory")
    client = Client(base, _token(url, "ops", TokenScope.WRITE))
    gets = [
        "/api/v1/runs/1/layers/a%00b/history",
        "/api/v1/runs/1/trend?kind=q%00",
        "/api/v1/runs?limit=%00",
        "/api/v1/runs/1/checkpoints/100/layers/x%00/esd",
        "/api/v1/runs/1/trend?method=ww%00",
        "/api/v1/compare?runs=1%00",
        "/metrics?x=%00",
        f"/api/v1/runs/1/layers/{'x' * 600}/history",
        f"/api/v1/runs/1/layers/{'x' * 300}/history",
        "/api/v1/runs/1/gate?min_alpha=nan",
        "/api/v1/runs/1/trend?metric=drop%20table",
        "/api/v1/runs/99999999999",
    ]
    for path in gets:
        status, body, _ = client.request("GET", path)
        assert 400 <= status < 500, (path, status, body)
        assert isinstance(body["detail"], str) and body["detail"], path
    posts = {
        str(root / ("x" * 300)): 422,
        str(root / ("y" * 255) / ("z" * 256)): 422,
        str(root / "loop"): 422,
        str(root / "a" / "deeper"): 422,
        str(root / "file"): 422,
        str(root / "missing"): 422,
        str(root) + "/run-dir\x00/etc": 422,
        "/" + "d/" * 2100: 422,
        "run-dir": 422,
        str(tmp_path): 403,
        str(root / ".." / ".."): 403,
    }
    for path, code in posts.items():
        status, body, _ = client.request("POST", "/api/v1/runs", {"name": "bad", "path": path})
        assert status == code, (path[:80], status, body)
        assert isinstance(body["detail"], str) and body["detail"], path[:80]
    # Nothing was registered, and the server still answers on the same connection.
    assert client.request("GET", "/api/v1/runs")[1]["total"] == 1
    assert len(client.local_ports) == 1
    client.close()


def test_503_means_the_database_is_unreachable() -> None:
    app = create_app(Settings(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    with serve(app) as base:
        client = Client(base)
        for path in ("/health", "/api/v1/runs", "/api/v1/runs/1/trend"):
            status, body, headers = client.request("GET", path)
            assert status == 503, (path, body)
            assert "unavailable" in body["detail"] and headers["retry-after"]
        # Bad input is still bad input, not an outage.
        assert client.request("GET", "/api/v1/runs/1/trend?kind=%00")[0] == 422
        client.close()


def test_token_scopes_expiry_and_revocation(site: tuple[str, str, Path]) -> None:
    base, url, root = site
    read, write, admin = (_token(url, s.value, s) for s in TokenScope)
    client = Client(base)
    body = {"name": "scoped", "path": str(root / "run-dir")}
    assert client.request("GET", "/api/v1/runs", token=read)[0] == 200
    status, refused, _ = client.request("POST", "/api/v1/runs", body, token=read)
    assert status == 403 and "'write'" in refused["detail"]
    status, created, _ = client.request("POST", "/api/v1/runs", body, token=write)
    assert status == 201
    run = f"/api/v1/runs/{created['id']}"
    assert client.request("DELETE", run, token=write)[0] == 403
    assert client.request("DELETE", run, token=read)[0] == 403
    # Revoked: refused by the very next request.
    with session_scope(make_engine(url)) as session:
        revoke_token(session, name="write")
    status, body401, headers = client.request("POST", "/api/v1/runs", body, token=write)
    assert status == 401 and "revoked" in body401["detail"]
    assert headers["www-authenticate"] == "Bearer"
    short = _token(url, "short", TokenScope.ADMIN, days=3 / 86_400)  # three seconds
    assert client.request("DELETE", run, token=short)[0] == 204
    time.sleep(3.5)
    status, body401, _ = client.request("POST", "/api/v1/runs", body, token=short)
    assert status == 401 and "expired" in body401["detail"]
    assert client.request("DELETE", "/api/v1/runs/1", token="aw_made_up")[0] == 401
    assert client.request("DELETE", "/api/v1/runs/1", token=admin)[0] == 204
    client.close()


def test_reads_and_metrics_behind_a_token(pg_url: str) -> None:
    read = _token(pg_url, "dash", TokenScope.READ)
    app = create_app(Settings(database_url=pg_url, read_requires_token=True))
    with serve(app) as base:
        client = Client(base)
        for path in ("/metrics", "/api/v1/runs", "/api/v1/runs/1/trend"):
            status, body, _ = client.request("GET", path)
            assert status == 401 and "token" in body["detail"], path
        assert client.request("GET", "/health")[0] == 200  # probes need no secret
        status, text, _ = client.request("GET", "/metrics", token=read)
        assert status == 200 and "alphawatch_runs 0" in text
        assert client.request("GET", "/api/v1/runs", token=read)[0] == 200
        with session_scope(make_engine(pg_url)) as session:
            revoke_token(session, name="dash")
        assert client.request("GET", "/metrics", token=read)[0] == 401
        client.close()
    doc = app.openapi()
    assert doc["paths"]["/metrics"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "401" in doc["paths"]["/api/v1/runs/{run_id}/trend"]["get"]["responses"]


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _send_huge(port: int, head: bytes, total: int, *, chunked: bool = False) -> bytes:
    """Send ``head`` and up to ``total`` body bytes; what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        chunk = b"x" * 2**20
        if chunked:
            chunk = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sent = 0
        sock.settimeout(0.2)
        answer = b""
        while sent < total:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except OSError:  # the server answered and closed: the rest is never read
                break
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if b"\r\n\r\n" in answer:
                break
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
        return answer


@pytest.mark.slow
def test_big_bodies_are_refused_without_growing_the_server(pg_url: str, tmp_path: Path) -> None:
    admin = _token(pg_url, "ops", TokenScope.ADMIN)
    port = free_port()
    env = {
        **os.environ,
        "ALPHAWATCH_DATABASE_URL": pg_url,
        "PYTHONPATH": str(ROOT),
        "ALPHAWATCH_ALLOWED_ROOTS": json.dumps([str(tmp_path)]),
        "ALPHAWATCH_MAX_BODY_BYTES": str(64 * 1024),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "alphawatch.service.api:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        for _ in range(300):
            probe = Client(f"http://127.0.0.1:{port}")
            try:
                if probe.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
            finally:
                probe.close()
        before = _peak_kib(server.pid)
        sixty_mb = 60 * 2**20
        # No token, 60 MB declared and sent: 401 before the body is read.
        answer = _send_huge(
            port,
            (
                f"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {sixty_mb}\r\n\r\n"
            ).encode(),
            sixty_mb,
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        # No token, chunked: the same.
        answer = _send_huge(
            port,
            b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            sixty_mb,
            chunked=True,
        )
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        # With a token, over the limit: 413 from the declared length, without reading it.
        auth = f"Authorization: Bearer {admin}\r\n"
        answer = _send_huge(
            port,
            (
                f"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\n{auth}"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {sixty_mb}\r\n\r\n"
            ).encode(),
            sixty_mb,
        )
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        # With a token, chunked and over the limit: 413 once the limit is crossed.
        chunk = b"x" * 4096
        framed = (b"%x\r\n" % len(chunk)) + chunk + b"\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                (
                    f"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\n{auth}"
                    "Content-Type: application/json\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
                + framed * 40
            )
            answer = sock.recv(65536)
        # Only the status line is sure to arrive: the server closes a socket that still holds
        # unread body, and the kernel may then drop the rest of the answer.
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        grown = _peak_kib(server.pid) - before
        assert grown < 16 * 1024, f"the server grew by {grown} KiB"
        # A body under the limit still works.
        (tmp_path / "ok").mkdir()
        fresh = Client(f"http://127.0.0.1:{port}", admin)
        assert (
            fresh.request("POST", "/api/v1/runs", {"name": "ok", "path": str(tmp_path / "ok")})[0]
            == 201
        )
        fresh.close()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
