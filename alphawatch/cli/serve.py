"""`up`, `watch` and `serve`: the long-running commands."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from alphawatch.cli.common import (
    EXIT_OK,
    UserError,
    check_dirs,
    exporter_of,
    is_embedded,
    prepare_database,
    settings_of,
    stop_on_signals,
)
from alphawatch.locations import ObjectURL


def run_up(args: argparse.Namespace) -> int:
    import uvicorn

    from alphawatch.service.api import create_app
    from alphawatch.workers.supervisor import Supervisor
    from alphawatch.workers.watcher import Watcher

    dirs = check_dirs(args.run_dir)
    settings = settings_of(args)
    folders = [d for d in dirs if isinstance(d, Path)]
    urls = [str(d) for d in dirs if isinstance(d, ObjectURL)]
    if not settings.allowed_roots:
        # The folders named and nothing above them: `up /runs` must not allow `/`.
        settings = settings.model_copy(update={"allowed_roots": folders})
    if not settings.allowed_url_roots and urls:
        # Likewise the URLs named: `up s3://b/team/run` allows that prefix, not the bucket.
        settings = settings.model_copy(update={"allowed_url_roots": urls})
    prepare_database(settings, migrate=True)
    exporter = exporter_of(settings)
    watcher = Watcher(settings, dirs, on_analysed=exporter)
    stop = threading.Event()
    # A worker loop that dies is restarted; /health answers 503 until it runs again.
    worker = Supervisor(
        watcher.run_forever, lambda: watcher.passes, stop, trouble=watcher.health.trouble
    )
    worker.start()
    print(
        f"alphawatch: dashboard at http://{settings.host}:{settings.port}/  "
        f"(database {settings.database_url})",
        flush=True,
    )
    try:
        # log_config=None: uvicorn's records reach the escaping handler of _configure_logging.
        uvicorn.run(
            create_app(settings, liveness=worker.liveness, bound_host=settings.host),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            log_config=None,
        )
    finally:
        stop.set()
        worker.join(timeout=60)
        if exporter is not None:
            exporter.close()
    return EXIT_OK


def run_watch(args: argparse.Namespace) -> int:
    """The worker; exits 0 when told to stop, after ``--max-jobs`` jobs or ``--exit-when-idle``.

    On SIGTERM or SIGINT the job in hand is finished within ``stop_grace_s``, else its
    analysis is stopped and the job given back to the queue; a second signal gives it back at
    once. Exit status: 0 for each of these ends; 2 for a usage or configuration error (a run
    folder that cannot be read, a database behind the code's schema); 1 for a fault the worker
    could not outlive (a traceback in the log).
    """
    from alphawatch.workers.probe import HealthServer
    from alphawatch.workers.watcher import Watcher

    if args.once and (args.max_jobs is not None or args.exit_when_idle is not None):
        raise UserError(
            "--once processes what is there: --max-jobs and --exit-when-idle are "
            "for a worker that polls"
        )
    if args.discover_only and args.max_jobs is not None:
        raise UserError("--discover-only analyses nothing: --max-jobs would never be reached")
    dirs = check_dirs(args.run_dir)
    settings = settings_of(args)
    prepare_database(settings, migrate=is_embedded(settings))
    exporter = exporter_of(settings)
    watcher = Watcher(settings, dirs, reanalyze=args.reanalyze, on_analysed=exporter)
    probe = None
    try:
        if args.once:
            count = watcher.run_once()
            print(f"alphawatch: analysed {count} checkpoints")
            return EXIT_OK
        if args.health_port is not None:
            probe = HealthServer(watcher.health.trouble, port=args.health_port)
            probe.start()
        stop = threading.Event()
        stop_on_signals(stop, again=watcher.abandon)
        watcher.run_forever(
            stop,
            max_jobs=args.max_jobs,
            exit_when_idle_s=args.exit_when_idle,
            analyse=not args.discover_only,
        )
    finally:
        if probe is not None:
            probe.close()
        if exporter is not None:
            exporter.close()
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from alphawatch.service.api import create_app

    settings = settings_of(args)
    prepare_database(settings, migrate=is_embedded(settings))
    print(f"alphawatch: API and dashboard at http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run(
        create_app(settings, bound_host=settings.host),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,
    )
    return EXIT_OK
