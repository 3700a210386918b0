"""Run service: registering, listing, reading and deleting runs and their checkpoints.

Keyword-only functions over a session, called by the thin routes; they raise the domain errors
of :mod:`alphawatch.service.api.errors`, never HTTP exceptions.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

from sqlalchemy import case, delete, func, select
from sqlalchemy.orm import Session

from alphawatch.locations import ObjectURL, is_url, object_url, url_allowed
from alphawatch.service.api import queries
from alphawatch.service.api.errors import Conflict, Invalid, NotFound, Refused
from alphawatch.service.db import registry, scans
from alphawatch.service.db.layers import LayerSelection
from alphawatch.service.db.models import AnalysisJob, Checkpoint, LayerMetric, Run
from alphawatch.settings import CrossCheck
from alphawatch.spreadsheet import write_csv
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import split_variant

# Linux's NAME_MAX and PATH_MAX (schemas.RunCreate states them too): longer names cannot
# exist, so they are refused before the file system is asked, which would raise.
NAME_MAX, PATH_MAX = 255, 4096


def allowed_path(raw: str, *, allowed_roots: list[Path]) -> Path:
    """``raw`` resolved (symlinks and '..' followed) when it is a directory under a root.

    Raises:
        Invalid: not absolute, NUL, too long, a symlink loop, not an existing directory.
        Refused: no root is configured, or the resolved path lies outside every root.
    """
    if "\x00" in raw:
        raise Invalid("path contains a NUL byte")
    given = Path(raw)
    if not given.is_absolute():
        raise Invalid("path must be absolute")
    if len(raw) > PATH_MAX or any(len(part) > NAME_MAX for part in given.parts):
        raise Invalid(f"path is too long (at most {PATH_MAX} characters, {NAME_MAX} per component)")
    if not allowed_roots:
        raise Refused("no checkpoint root is allowed on this server (set ALPHAWATCH_ALLOWED_ROOTS)")
    try:
        # Follows symlinks and '..': what is checked against the roots is where the path leads.
        resolved = given.resolve()
    except RuntimeError as exc:  # Python 3.11 reports a symlink loop this way
        raise Invalid(f"path cannot be resolved: {exc}") from exc
    except OSError as exc:
        raise Invalid(f"path cannot be resolved: {_reason(exc)}") from exc
    if not any(resolved == root or root in resolved.parents for root in allowed_roots):
        raise Refused(f"{raw} is not under an allowed root ({', '.join(map(str, allowed_roots))})")
    try:
        is_dir = resolved.is_dir()
    except OSError as exc:
        raise Invalid(f"{resolved} cannot be read: {_reason(exc)}") from exc
    if not is_dir:
        raise Invalid(f"{resolved} is not an existing directory")
    return resolved


def allowed_location(
    raw: str, *, allowed_roots: list[Path], url_roots: list[str]
) -> Path | ObjectURL:
    """A local run folder as :func:`allowed_path` checks it, or an object-store URL that lies
    under one of ``url_roots`` (``s3://bucket/team``; segment by segment).

    A URL is checked by its text alone: the service never reads a checkpoint, so whether the
    prefix holds anything is the worker's to find (it records why a run cannot be listed).

    Raises:
        Invalid: a URL that is not in normal form (``..``, empty segments, credentials).
        Refused: no URL root is configured, or the URL lies outside every one.
    """
    if not is_url(raw):
        return allowed_path(raw, allowed_roots=allowed_roots)
    try:
        url = object_url(raw)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    if not url_roots:
        raise Refused(
            "no object-store root is allowed on this server (add a URL prefix such as "
            "s3://bucket/runs to ALPHAWATCH_ALLOWED_ROOTS)"
        )
    if not url_allowed(url, url_roots):
        raise Refused(f"{url} is not under an allowed root ({', '.join(url_roots)})")
    return url


def _reason(exc: OSError) -> str:
    return "a symlink loop" if exc.errno == errno.ELOOP else os.strerror(exc.errno or 0)


def list_runs(
    *, session: Session, limit: int, offset: int, thresholds: Thresholds, method: str
) -> dict[str, Any]:
    """A page of runs with their summaries (of ``method``'s rows), and how many runs there are."""
    total = session.scalar(select(func.count()).select_from(Run)) or 0
    rows = session.scalars(select(Run).order_by(Run.id).limit(limit).offset(offset)).all()
    lags = queries.run_lags(session=session, run_ids=[r.id for r in rows])
    return {
        "runs": [
            queries.run_summary(
                session=session, run=r, thresholds=thresholds, method=method, lags=lags[r.id]
            )
            for r in rows
        ],
        "total": total,
    }


def get(
    *,
    session: Session,
    run_id: int,
    trust: Thresholds,
    method: str,
    crosscheck: CrossCheck | None = None,
) -> dict[str, Any]:
    """One run's summary, the trust thresholds applied, the fit methods it holds and what the
    live cross-check with weightwatcher found."""
    run = queries.get_run(session=session, run_id=run_id)
    # Methods of the latest analysed checkpoint: scanning every layer row of a long run for
    # DISTINCT would cost more than the rest of the page.
    latest = session.scalar(
        select(Checkpoint.id)
        .where(Checkpoint.run_id == run_id, queries.ANALYSED)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    )
    methods = (
        sorted(
            set(
                session.scalars(
                    select(LayerMetric.method).where(LayerMetric.checkpoint_id == latest).distinct()
                )
            )
        )
        if latest is not None
        else []
    )
    check = crosscheck or CrossCheck()
    n, largest, over = session.execute(
        select(
            func.count(LayerMetric.crosscheck_diff),
            func.max(LayerMetric.crosscheck_diff),
            func.coalesce(
                func.sum(case((LayerMetric.crosscheck_diff > check.tolerance, 1), else_=0)), 0
            ),
        )
        .join(Checkpoint, Checkpoint.id == LayerMetric.checkpoint_id)
        .where(Checkpoint.run_id == run_id, LayerMetric.crosscheck_diff.is_not(None))
    ).one()
    return {
        **queries.run_summary(session=session, run=run, thresholds=trust, method=method),
        "thresholds": trust,
        "methods": methods,
        "crosscheck": {
            "layers": int(n),
            "max_diff": largest,
            "over_tolerance": int(over),
            "tolerance": check.tolerance,
            "share": check.share,
        },
    }


def create(
    *, session: Session, name: str, path: Path | ObjectURL, thresholds: Thresholds, method: str
) -> dict[str, Any]:
    """Register a run at an already checked ``path``; its summary.

    Raises:
        Conflict: a run of that name exists.
    """
    if session.scalars(select(Run.id).where(Run.name == name)).first() is not None:
        raise Conflict(f"a run named {name!r} exists already")
    run_id = registry.ensure_run(session, name=name, path=str(path))
    session.flush()
    return queries.run_summary(
        session=session,
        run=queries.get_run(session=session, run_id=run_id),
        thresholds=thresholds,
        method=method,
    )


def request_scan(*, session: Session, run_id: int) -> dict[str, Any]:
    """Record a "scan now" for the run: the discovering worker scans it fully within a second.

    Raises:
        NotFound: no such run.
    """
    requested_at = scans.request_scan(session, run_id=run_id)
    if requested_at is None:
        raise NotFound(f"run {run_id} not found")
    return {"run_id": run_id, "requested_at": requested_at}


def delete_run(*, session: Session, run_id: int) -> None:
    """Delete a run and, by cascade, everything stored for it (never the checkpoint files)."""
    queries.get_run(session=session, run_id=run_id)
    session.execute(delete(Run).where(Run.id == run_id))


def checkpoints(*, session: Session, run_id: int, limit: int, offset: int) -> dict[str, Any]:
    """A page of a run's checkpoints, by step, with analysis status, timings and attempts."""
    queries.get_run(session=session, run_id=run_id)
    rows = session.execute(
        select(Checkpoint, AnalysisJob.attempts)
        .outerjoin(AnalysisJob)
        .where(Checkpoint.run_id == run_id)
        .order_by(Checkpoint.step)
        .limit(limit)
        .offset(offset)
    ).all()
    return {
        "run_id": run_id,
        "checkpoints": [
            {
                "id": c.id,
                "step": c.step,
                "path": c.path,
                "format": c.format,
                "status": c.status,
                "error": c.error,
                "discovered_at": c.discovered_at,
                "started_at": c.started_at,
                "finished_at": c.finished_at,
                "analysis_s": c.analysis_s,
                "device": c.device,
                "n_layers": c.n_layers,
                "n_trusted": c.n_trusted,
                "attempts": attempts,
                "discovery_error": c.discovery_error,
                "analysis_count": c.analysis_count,
                "rewritten_at": c.rewritten_at,
            }
            for c, attempts in rows
        ],
    }


def checkpoint_layers(*, session: Session, run_id: int, step: int, method: str) -> dict[str, Any]:
    """Every layer metric of one checkpoint (every variant), by block then kind."""
    queries.get_run(session=session, run_id=run_id)
    checkpoint_id = queries.checkpoint_id_at(session=session, run_id=run_id, step=step)
    layers = queries.layer_dicts(
        session=session,
        checkpoint_ids=[checkpoint_id],
        layers=LayerSelection(method=method, variant=None),
    )
    return {
        "run_id": run_id,
        "step": step,
        "method": method,
        "layers": sorted(layers, key=queries.layer_order),
    }


def layers_csv(*, session: Session, run_id: int, method: str) -> str:
    """Every layer metric of every analysed checkpoint of a run, as CSV text."""
    queries.get_run(session=session, run_id=run_id)
    steps = dict(queries.done_checkpoints(session=session, run_id=run_id))
    # Every variant: weights, gradients (name@exp_avg) and nested widths (name@w<k>), each row
    # saying which in its own column.
    layers = queries.layer_dicts(
        session=session,
        checkpoint_ids=list(steps),
        layers=LayerSelection(method=method, variant=None),
    )
    buffer = io.StringIO()
    # flat cells only: the trap localisation (JSON) is served by the layer drill-down
    skip = ("checkpoint_id", "trap_localisation")
    columns = ["step", *[c for c in (layers[0] if layers else {}) if c not in skip]]
    columns.insert(columns.index("name") + 1 if "name" in columns else 1, "variant")
    write_csv(
        buffer,
        columns,
        (
            {
                **layer,
                "step": steps[layer["checkpoint_id"]],
                "variant": split_variant(layer["name"])[1],
            }
            for layer in layers
        ),
    )
    return buffer.getvalue()


def ping(*, session: Session) -> None:
    """Raise when the database cannot answer."""
    session.execute(select(1))
