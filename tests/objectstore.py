"""A real S3 API on 127.0.0.1 (moto's server mode) that counts the requests it answers.

Used by the object-store tests and bench/bench_objects.py. The server is moto's own WSGI
application; :class:`CountingServer` only wraps it to count each request by kind (LIST, HEAD,
GET, PUT, other), which is what an object store bills.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# Credentials the tests put in the environment: the secret must never appear in a log line, a
# stored row or an API answer.
SECRET = "alphawatch-test-secret-9f1c2e7d"
KEY_ID = "AKIAALPHAWATCHTEST"


def request_kind(environ: dict[str, Any]) -> str:
    method = environ.get("REQUEST_METHOD", "")
    query = environ.get("QUERY_STRING", "")
    path = environ.get("PATH_INFO", "")
    if method == "GET" and ("list-type" in query or "prefix=" in query or path.count("/") <= 1):
        return "LIST"
    return {"GET": "GET", "HEAD": "HEAD", "PUT": "PUT"}.get(method, "OTHER")


class CountingServer:
    """moto's S3 server on 127.0.0.1 (a free port), its requests counted in :attr:`counts`."""

    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        # What moto's ThreadedMotoServer serves, wrapped to count.
        app = DomainDispatcherApplication(create_backend_app)
        self.counts: Counter[str] = Counter()
        # (kind, path, Range header or None) of every request, for the tests that look closer.
        self.log: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()

        def counting(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            kind = request_kind(environ)
            with self.lock:
                self.counts[kind] += 1
                self.log.append((kind, environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE")))
            return app(environ, start)

        self.server = make_server(
            "127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler
        )
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.log.clear()

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=5)


def environment(server: CountingServer) -> dict[str, str]:
    """The standard variables that point s3fs/botocore at ``server`` with test credentials."""
    return {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": server.url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextmanager
def variables(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client_fs(server: CountingServer) -> Any:
    """An s3fs file system on ``server`` for the tests' own uploads (not alphawatch's)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY_ID,
        secret=SECRET,
        client_kwargs={"endpoint_url": server.url, "region_name": "us-east-1"},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


def make_bucket(server: CountingServer, name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=server.url,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=name)


def upload(
    fs: Any, local: Path, url: str, order: Callable[[list[Path]], list[Path]] = sorted
) -> None:
    """Every file below ``local`` to ``url`` (``s3://bucket/prefix``, ``gs://...`` with a
    gcsfs ``fs``), in ``order``."""
    base = url.partition("://")[2].rstrip("/")
    files = [p for p in local.rglob("*") if p.is_file()]
    for file in order(files):
        fs.pipe_file(f"{base}/{file.relative_to(local).as_posix()}", file.read_bytes())


# The fixtures of the tests that use a bucket: one server per test module, a fresh bucket per test.
@pytest.fixture(scope="module")
def s3() -> Iterator[CountingServer]:
    server = CountingServer()
    with variables(environment(server)):
        yield server
    server.stop()


@pytest.fixture
def bucket(s3: CountingServer) -> str:
    name = f"runs-{uuid.uuid4().hex[:12]}"
    make_bucket(s3, name)
    return name
