"""Delivering gate alerts: threads of each worker POST due alerts to the webhook.

The analysis loop never waits for a receiver: it only commits the alert row (with the results
that caused it, ``service.db.alerts``) and wakes these threads. Each of
``ALPHAWATCH_ALERTS__SENDERS`` threads claims a due alert with a lease, POSTs it and records the
attempt: delivered on 2xx; due again after an exponential backoff on a network error, a
timeout, 5xx, 408, 425 or 429; failed at once on an answer retrying cannot change (other 4xx, a
redirect, which is never followed) or when its attempts are spent. A worker that dies
mid-delivery leaves a lease that runs out, and the alert is sent again by whichever worker comes
next: at least once. The claim keeps one run's alerts in order and coalesces a flapping verdict
(``service.db.alerts.claim``).

No receiver holds anything up for long. ``ALPHAWATCH_ALERTS__TIMEOUT_S`` bounds a whole attempt,
not each read: a receiver that answers one byte at a time has its socket shut down when the
time is up (a per-read timeout alone let a byte every 2 s hold an alert for minutes). And the
senders work side by side, so an attempt in progress holds one of them, never the others' runs.

Only ``http.client`` is used, to the host of an http(s) URL checked by the settings: no
redirect, proxy variable or other URL scheme can take the request anywhere else. The URL
(often a secret, as Slack's are) is never logged or stored; errors name the host only.

Nothing ends the senders but :meth:`AlertDispatcher.stop`: a fault while sending one alert (a
bug, a host name no resolver takes) is recorded on that alert like a failed attempt, and a fault
of the loop itself (the database) is logged and retried after a pause that doubles while it
lasts.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import unquote, urlsplit

from sqlalchemy import Engine

from alphawatch import __version__
from alphawatch.service.db import alerts
from alphawatch.service.db.session import session_scope
from alphawatch.settings import AlertSettings

log = logging.getLogger("alphawatch.alerts")

# Answers worth another attempt: the receiver is down, overloaded or asks to slow down.
RETRYABLE = frozenset({408, 425, 429})
_SNIPPET = 300
# Longest pause of a sender whose loop keeps failing (the database is down, say): long enough
# not to flood the log, short enough that alerts flow soon after the fault is gone.
_LOOP_PAUSE_MAX_S = 60.0


@dataclass(frozen=True)
class Attempt:
    """What one POST came to."""

    status_code: int | None  # the receiver's HTTP status; None when no answer came
    error: str | None  # None: delivered
    retry: bool  # whether another attempt could succeed


class _Deadline:
    """Shuts down the socket it watches when its time is up, ending any read or write on it.

    A per-socket timeout bounds each read, not the answer: a receiver sending a byte a second
    would never trip it. Use as a context manager around the whole attempt.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline; raises TimeoutError if it has passed already."""
        with self._lock:
            if self.expired:
                raise TimeoutError(f"no answer within {self.seconds:g}s")
            self._sock = sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                with contextlib.suppress(OSError):  # closed meanwhile
                    self._sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._timer.cancel()
        with self._lock:
            self._sock = None  # closed by its owner next; never shut down after that


def _open(host: str, port: int, tls: ssl.SSLContext | None, deadline: _Deadline) -> socket.socket:
    """A connected socket to ``host``, TLS handshake done, watched by ``deadline``."""
    sock = socket.create_connection((host, port), timeout=deadline.seconds)
    try:
        deadline.watch(sock)
        if tls is None:
            return sock
        # The handshake too runs under the deadline: wrapped first, shaken hands after.
        wrapped = tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        deadline.watch(wrapped)
        wrapped.do_handshake()
    except BaseException:
        wrapped.close()
        raise
    return wrapped


def post_json(url: str, body: bytes, *, timeout_s: float) -> Attempt:
    """POST ``body`` as JSON to ``url`` within ``timeout_s`` in all; never follows a redirect.

    Returns the outcome of any network or HTTP failure (it raises on nothing the receiver or the
    network can do); past ``timeout_s`` the attempt is cut off and counts as a timeout, whatever
    stage it had reached.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Attempt(None, "the webhook URL is not http(s) with a host", retry=False)
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        return Attempt(None, "the webhook URL has an invalid port", retry=False)
    connection: http.client.HTTPConnection
    tls: ssl.SSLContext | None = None
    if parts.scheme == "https":
        tls = ssl.create_default_context()
        connection = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=tls)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", "User-Agent": f"alphawatch/{__version__}"}
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
    deadline = _Deadline(timeout_s)
    try:
        with deadline:
            # Set before request(): http.client then sends on it instead of connecting itself.
            connection.sock = _open(host, connection.port, tls, deadline)
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            if deadline.expired:
                # Shut down mid-header, http.client takes the end of the stream for the end of
                # the headers: what it parsed may be a torn answer, not the receiver's.
                raise TimeoutError("the deadline passed while reading the answer")
            code = response.status
            try:
                snippet = response.read(_SNIPPET).decode("utf-8", "replace").strip()
            except (OSError, http.client.HTTPException):
                snippet = ""  # the answer's status is what counts
    except (OSError, http.client.HTTPException) as exc:  # timeouts are OSErrors
        if deadline.expired:
            return Attempt(
                None,
                f"{host}: no complete answer within {timeout_s:g}s, the deadline of an attempt",
                retry=True,
            )
        return Attempt(None, f"{host}: {type(exc).__name__}: {exc}"[:1000], retry=True)
    finally:
        connection.close()
    if 200 <= code < 300:
        return Attempt(code, None, retry=False)
    error = f"{host} answered HTTP {code}" + (f": {snippet}" if snippet else "")
    if 300 <= code < 400:
        error += " (redirects are not followed: set the final URL)"
    return Attempt(code, error[:1000], retry=code >= 500 or code in RETRYABLE)


def backoff_s(attempts: int, config: AlertSettings) -> float:
    """Wait after the ``attempts``-th failed attempt: doubling from backoff_s, capped."""
    return float(min(config.backoff_max_s, config.backoff_s * 2 ** (attempts - 1)))


class _Budget:
    """How many attempts one delivery pass may still make, shared by its senders."""

    def __init__(self, limit: int) -> None:
        self._left = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            self.used += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._left += 1
            self.used -= 1


class AlertDispatcher:
    """Delivers due alerts in daemon threads until stopped; :meth:`wake` after queueing one.

    Args:
        config: the webhook URL, deadline, senders, interval, attempts and backoff.
        engine: the database the alerts are in.
        worker_id: whose leases these are.
    """

    def __init__(self, config: AlertSettings, engine: Engine, worker_id: str) -> None:
        if config.webhook_url is None:
            raise ValueError("no alert webhook URL is configured")
        self.config = config
        self.url = config.webhook_url
        self.engine = engine
        self.worker_id = worker_id
        # Longer than one attempt can take (its deadline) and the writes around it.
        self.lease_s = config.timeout_s + 60
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the senders, each in a new thread (after :meth:`stop`, fresh ones)."""
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._run, name=f"alerts-{i}", daemon=True)
            for i in range(self.config.senders)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the senders; an attempt in flight may finish later (its lease covers it)."""
        self._stop.set()
        self._wake.set()
        until = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))

    def wake(self) -> None:
        """Look for due alerts now instead of at the next poll."""
        self._wake.set()

    def deliver_due(self, *, limit: int = 100) -> int:
        """Attempt every alert due now (at most ``limit``), ``senders`` at a time.

        Returns how many were attempted. Raises what a sender's database work raised (the
        others finish their attempts first).
        """
        with session_scope(self.engine) as session:
            alerts.recover_stale(session, max_attempts=self.config.max_attempts)
        budget = _Budget(limit)
        faults: list[BaseException] = []

        def drain() -> None:
            try:
                self._drain(budget)
            except BaseException as exc:  # handed to the caller below
                faults.append(exc)

        helpers = [
            threading.Thread(target=drain, name=f"alerts-pass-{i}", daemon=True)
            for i in range(self.config.senders - 1)
        ]
        for helper in helpers:
            helper.start()
        drain()
        for helper in helpers:
            helper.join()
        if faults:
            raise faults[0]
        return budget.used

    def _drain(self, budget: _Budget) -> None:
        """Claim and send one alert after another until none is due or the budget is spent."""
        while not self._stop.is_set() and budget.take():
            with session_scope(self.engine) as session:
                claimed = alerts.claim(
                    session,
                    worker_id=self.worker_id,
                    lease_s=self.lease_s,
                    min_interval_s=self.config.min_interval_s,
                )
            if claimed is None:
                budget.give_back()
                return
            self._send(claimed)

    def _send(self, claimed: alerts.ClaimedAlert) -> None:
        """POST one claimed alert and record the attempt."""
        try:
            attempt = post_json(self.url, claimed.payload, timeout_s=self.config.timeout_s)
        except Exception as exc:  # a fault of ours, not the receiver's: the alert says which
            log.exception("alert %s: sending it failed", claimed.alert_id)
            attempt = Attempt(None, f"{type(exc).__name__}: {exc}"[:1000], retry=True)
        retry_in = (
            backoff_s(claimed.attempts, self.config)
            if attempt.error is not None
            and attempt.retry
            and claimed.attempts < self.config.max_attempts
            else None
        )
        with session_scope(self.engine) as session:
            alerts.finish(
                session,
                alert_id=claimed.alert_id,
                worker_id=self.worker_id,
                status_code=attempt.status_code,
                error=attempt.error,
                retry_in_s=retry_in,
            )
        if attempt.error is None:
            log.info("alert %s of run %s delivered", claimed.alert_id, claimed.run_id)
        elif retry_in is not None:
            log.warning(
                "alert %s: attempt %d failed (%s); next in %.0fs",
                claimed.alert_id,
                claimed.attempts,
                attempt.error,
                retry_in,
            )
        else:
            log.error(
                "alert %s given up after %d attempts: %s",
                claimed.alert_id,
                claimed.attempts,
                attempt.error,
            )

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with session_scope(self.engine) as session:
                    alerts.recover_stale(session, max_attempts=self.config.max_attempts)
                self._drain(_Budget(100))
                with session_scope(self.engine) as session:
                    due = alerts.next_due_in(session)
            except Exception:  # the database, or a bug: logged, paused, never the end
                failures += 1
                pause = min(backoff_s(failures, self.config), _LOOP_PAUSE_MAX_S)
                log.exception(
                    "alert delivery failed (%d in a row); trying again in %.1fs", failures, pause
                )
                # Not woken early: a fault that lasts must not be hit after every checkpoint.
                self._stop.wait(pause)
                continue
            failures = 0
            wait = self.config.poll_s if due is None else min(self.config.poll_s, max(due, 0.01))
            self._wake.wait(wait)
            self._wake.clear()
