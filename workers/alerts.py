"""Delivering gate alerts: a thread of each worker POSTs due alerts to the webhook.

The analysis loop never waits for a receiver: it only commits the alert row (with the results
that caused it, ``service.db.alerts``) and wakes this thread. The thread claims due alerts with
a lease, POSTs each with a timeout, and records the attempt: delivered on 2xx; due again after
an exponential backoff on a network error, a timeout, 5xx, 408, 425 or 429; failed at once on an
answer retrying cannot change (other 4xx, a redirect, which is never followed) or when its
attempts are spent. A worker that dies mid-delivery leaves a lease that runs out, and the alert
is sent again by whichever worker comes next: at least once. The claim keeps one run's alerts in
order and coalesces a flapping verdict (``service.db.alerts.claim``).

Only ``http.client`` is used, to the host of an http(s) URL checked by the settings: no
redirect, proxy variable or other URL scheme can take the request anywhere else, and every
socket operation is bounded by ``ALPHAWATCH_ALERTS__TIMEOUT_S``. The URL (often a secret, as
Slack's are) is never logged or stored; errors name the host only.
"""

from __future__ import annotations

import base64
import http.client
import logging
import ssl
import threading
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Attempt:
    """What one POST came to."""

    status_code: int | None  # the receiver's HTTP status; None when no answer came
    error: str | None  # None: delivered
    retry: bool  # whether another attempt could succeed


def post_json(url: str, body: bytes, *, timeout_s: float) -> Attempt:
    """POST ``body`` as JSON to ``url``; never raises, never follows a redirect."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Attempt(None, "the webhook URL is not http(s) with a host", retry=False)
    host = parts.hostname
    try:
        port = parts.port
    except ValueError:
        return Attempt(None, "the webhook URL has an invalid port", retry=False)
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(host, port, timeout=timeout_s,
                                                 context=ssl.create_default_context())
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", "User-Agent": f"alphawatch/{__version__}"}
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(secret).decode()
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        code = response.status
        snippet = response.read(_SNIPPET).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:  # timeouts are OSErrors
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


class AlertDispatcher:
    """Delivers due alerts in a daemon thread until stopped; :meth:`wake` after queueing one.

    Args:
        config: the webhook URL, timeout, attempts and backoff.
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
        # Longer than one attempt can take (connect, send, read, each bounded by the timeout).
        self.lease_s = 3 * config.timeout_s + 30
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start delivering in a new thread (after :meth:`stop`, a fresh one)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread; an attempt in flight may finish later (its lease covers it)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Look for due alerts now instead of at the next poll."""
        self._wake.set()

    def deliver_due(self, *, limit: int = 100) -> int:
        """Attempt every alert due now (at most ``limit``); returns how many were attempted."""
        with session_scope(self.engine) as session:
            alerts.recover_stale(session, max_attempts=self.config.max_attempts)
        attempted = 0
        while attempted < limit and not self._stop.is_set():
            with session_scope(self.engine) as session:
                claimed = alerts.claim(session, worker_id=self.worker_id, lease_s=self.lease_s,
                                       min_interval_s=self.config.min_interval_s)
            if claimed is None:
                break
            attempt = post_json(self.url, claimed.payload, timeout_s=self.config.timeout_s)
            retry_in = (backoff_s(claimed.attempts, self.config)
                        if attempt.error is not None and attempt.retry
                        and claimed.attempts < self.config.max_attempts else None)
            with session_scope(self.engine) as session:
                alerts.finish(session, alert_id=claimed.alert_id, worker_id=self.worker_id,
                              status_code=attempt.status_code, error=attempt.error,
                              retry_in_s=retry_in)
            if attempt.error is None:
                log.info("alert %s of run %s delivered", claimed.alert_id, claimed.run_id)
            elif retry_in is not None:
                log.warning("alert %s: attempt %d failed (%s); next in %.0fs", claimed.alert_id,
                            claimed.attempts, attempt.error, retry_in)
            else:
                log.error("alert %s given up after %d attempts: %s", claimed.alert_id,
                          claimed.attempts, attempt.error)
            attempted += 1
        return attempted

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.config.poll_s
            try:
                self.deliver_due()
                with session_scope(self.engine) as session:
                    due = alerts.next_due_in(session)
                if due is not None:
                    wait = min(wait, max(due, 0.01))
            except Exception:  # a database hiccup or a bug: never ends the worker
                log.exception("alert delivery failed; trying again in %.0fs", wait)
            self._wake.wait(wait)
            self._wake.clear()
