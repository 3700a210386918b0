"""The training process's side of alphawatch: register a run, ask for a scan, read the gate.

Runs inside the user's training loop, so it imports the standard library only, waits a few
seconds at most for any answer, and never raises: a server that cannot be reached costs one
warning, after which calls are skipped for a while (``retry_after_s``) and training goes on.

    link = RunLink(url="http://alphawatch:8000", token="...")
    link.start(Path("runs/my-llama"), default_name="my-llama")   # at train begin
    link.saved()                                                  # after each checkpoint save
    if link.gate_failed(): ...                                    # stop_on_gate

A run may live in object storage: ``link.start("s3://bucket/prefix/my-llama")`` registers that
URL as it is written (a URL is text, never a ``Path``, which would collapse its ``//``); nothing is
created for it (object stores have no folders) and no credential ever travels to the server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("alphawatch.integrations")

DEFAULT_URL = "http://127.0.0.1:8000"
# A run name the API accepts (schemas.RunCreate): word characters, dots and dashes.
_NAME_UNSAFE = re.compile(r"[^\w.\-]+")
# A URL (scheme://...): kept as text; the server says whether it takes the scheme.
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://.*", re.DOTALL)


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``s3://bucket/run``) rather than a local path: only a ``str``
    can be (``Path("s3://b/x")`` is the local path ``s3:/b/x``)."""
    return isinstance(path, str) and _URL.fullmatch(path) is not None


def place(path: str | Path) -> str:
    """The text a run's place is registered as: a URL as written, less a trailing slash; a
    local path absolute and resolved."""
    if is_url(path):
        return str(path).rstrip("/")
    return str(Path(path).resolve())


class LinkError(Exception):
    """One failed call: the server is unreachable or answered with an error.

    Attributes:
        kind: what went wrong, one warning per kind ("unreachable", "scan", "gate", ...).
        status: the HTTP status, when the server answered.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class RegisteredRun:
    """A run as the server knows it."""

    id: int
    name: str
    path: str


class Client:
    """Blocking JSON calls to ``/api/v1`` with a short timeout (standard library only).

    Args:
        url: base URL of the alphawatch API (``http://host:8000``).
        token: API token; registering a run and asking for a scan need a ``write`` one.
        timeout_s: the longest a call may wait for the server.
    """

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 5.0) -> None:
        self.base = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """The decoded JSON answer of one call; raises :class:`LinkError` on any failure."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            f"{self.base}/api/v1{path}", data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_s if timeout_s is None else timeout_s
            ) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _detail(exc)
            raise LinkError(
                f"{method} {path}: HTTP {exc.code}: {detail}", kind="http", status=exc.code
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LinkError(f"cannot reach {self.base}: {reason}", kind="unreachable") from exc
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise LinkError(f"{method} {path}: the answer is not JSON", kind="http") from exc

    def register(self, *, name: str, path: str | Path) -> RegisteredRun:
        """Register ``path`` (a local path, or a URL such as ``s3://bucket/run``, sent as
        written) as run ``name``; the existing run when the name is taken."""
        try:
            run = self.call("POST", "/runs", {"name": name, "path": str(path)})
        except LinkError as exc:
            if exc.status != 409:
                raise
            found = self.find(name)
            if found is None:
                raise
            return found
        return RegisteredRun(int(run["id"]), str(run["name"]), str(run["path"]))

    def find(self, name: str, *, page: int = 1000) -> RegisteredRun | None:
        """The run called ``name``, or None; pages of ``page`` runs (the API's largest) are read
        until it is found or every run has been seen."""
        offset = 0
        while True:
            answer = self.call("GET", f"/runs?limit={page}&offset={offset}")
            for run in answer["runs"]:
                if run["name"] == name:
                    return RegisteredRun(int(run["id"]), str(run["name"]), str(run["path"]))
            offset += page
            if offset >= int(answer["total"]) or not answer["runs"]:
                return None

    def scan(self, run_id: int) -> Any:
        """Ask the workers to look at the run's folder now rather than at their next poll."""
        return self.call("POST", f"/runs/{run_id}/scan")

    def gate(
        self, run_id: int, query: Mapping[str, object] | None = None, *, wait_s: float = 0
    ) -> dict[str, Any]:
        """The run's gate verdict: the server's rules for it, but for those ``query`` names.

        With ``wait_s`` the server holds the answer up to that long (60 s at most) until the step
        is analysed; ``pending: true`` in the verdict says it was not yet.
        """
        params = dict(query or {})
        timeout_s = self.timeout_s
        if wait_s > 0:
            params["wait_s"] = f"{wait_s:g}"
            # The call's own timeout must outlast the wait it asks for.
            timeout_s += wait_s
        suffix = f"?{urllib.parse.urlencode(params)}" if params else ""
        verdict: dict[str, Any] = self.call(
            "GET", f"/runs/{run_id}/gate{suffix}", timeout_s=timeout_s
        )
        return verdict


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read(2000).decode(errors="replace")
        detail = json.loads(body).get("detail", body)
    except (ValueError, OSError, AttributeError):
        return str(exc.reason)
    return str(detail)


def run_name_of(path: str | Path) -> str:
    """A valid run name made from a folder's name (a URL's last segment, or its bucket)."""
    if is_url(path):
        last = str(path).rstrip("/").partition("://")[2].rpartition("/")[2]
    else:
        last = Path(path).resolve().name
    name = _NAME_UNSAFE.sub("-", last).strip("-.")
    return name[:255] or "run"


def gate_failed(verdict: dict[str, Any]) -> bool:
    """True when the gate failed on an analysed checkpoint (not merely for want of one)."""
    if verdict.get("passed", True):
        return False
    rules = {v.get("rule") for v in verdict.get("violations", [])}
    return "no_data" not in rules and verdict.get("step") is not None


class RunLink:
    """What every training-loop callback does, whatever its framework; never raises.

    Args:
        url: base URL of the API; ``ALPHAWATCH_URL`` or http://127.0.0.1:8000 when None.
        token: a ``write`` token; ``ALPHAWATCH_TOKEN`` when None.
        run_name: the run's name; the checkpoint folder's name when None.
        timeout_s: the longest one call waits.
        retry_after_s: after a failed call, calls are skipped this long (a server that is
            down costs the training loop nothing).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        run_name: str | None = None,
        *,
        timeout_s: float = 5.0,
        retry_after_s: float = 30.0,
    ) -> None:
        self.client = Client(
            url or os.environ.get("ALPHAWATCH_URL") or DEFAULT_URL,
            token if token is not None else os.environ.get("ALPHAWATCH_TOKEN"),
            timeout_s,
        )
        self.run_name = run_name
        self.retry_after_s = retry_after_s
        self.run: RegisteredRun | None = None
        self.path: str | None = None
        self.last_verdict: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._quiet_until = 0.0

    def start(self, path: str | Path, *, default_name: str | None = None) -> RegisteredRun | None:
        """Register ``path`` as a run; the run, or None on failure.

        A local folder is created when missing; a URL (``s3://bucket/prefix/run``, a ``str``)
        is registered as written, less a trailing slash, and nothing is created for it.
        """
        if is_url(path) and "@" in str(path).partition("://")[2].partition("/")[0]:
            # Never sent, stored or logged: the workers read the bucket with their own chain.
            self._warn(
                "folder",
                "a run URL carrying credentials (user@ or key:secret@) is not registered; "
                "credentials come from the cloud's standard chain on the workers",
            )
            return None
        self.path = place(path)
        if not is_url(path):
            try:
                Path(self.path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._warn("folder", f"cannot create {self.path}: {exc}")
                return None
        self._quiet_until = 0.0
        return self._registered()

    def saved(self) -> bool:
        """After a checkpoint save: ask for a scan now. True when the server took it."""
        run = self._registered()
        if run is None:
            return False
        return self._attempt("scan", lambda: self.client.scan(run.id)) is not None

    def gate_failed(self) -> bool:
        """Read the run's gate; True only when it fails on an analysed checkpoint."""
        run = self._registered()
        if run is None:
            return False
        verdict = self._attempt("gate", lambda: self.client.gate(run.id))
        if not isinstance(verdict, dict):
            return False
        self.last_verdict = verdict
        return gate_failed(verdict)

    def _registered(self) -> RegisteredRun | None:
        if self.run is None and self.path is not None:
            path, name = self.path, self.run_name or run_name_of(self.path)
            run = self._attempt("register", lambda: self.client.register(name=name, path=path))
            if isinstance(run, RegisteredRun):
                self.run = run
                if run.path != path and (is_url(path) or Path(run.path) != Path(path)):
                    self._warn(
                        "path",
                        f"run {run.name!r} exists at {run.path}, not at {path}: "
                        "its folder is the one scanned",
                    )
                log.info(
                    "alphawatch: watching %s as run %r (id %d) at %s",
                    path,
                    run.name,
                    run.id,
                    self.client.base,
                )
        return self.run

    def _attempt(self, what: str, call: Any) -> Any:
        if time.monotonic() < self._quiet_until:
            return None
        try:
            return call()
        except LinkError as exc:
            kind = "unreachable" if exc.kind == "unreachable" else what
            if exc.kind == "unreachable":
                self._quiet_until = time.monotonic() + self.retry_after_s
            self._warn(
                kind,
                f"{what} failed: {exc}; training goes on"
                + (_HINTS.get(what, "") if exc.status in (404, 405) else ""),
            )
            return None
        except Exception as exc:  # a callback must never break the training it watches
            self._warn(what, f"{what} failed unexpectedly: {type(exc).__name__}: {exc}")
            return None

    def _warn(self, kind: str, message: str) -> None:
        if kind in self._warned:
            log.debug("alphawatch: %s", message)
            return
        self._warned.add(kind)
        log.warning("alphawatch: %s (further such failures are logged at debug level)", message)


_HINTS = {
    "scan": " (this server cannot be asked to scan: new checkpoints are found at the "
    "worker's next poll)"
}
