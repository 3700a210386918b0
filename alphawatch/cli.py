"""The ``alphawatch`` command line.

    alphawatch up RUN_DIR            API + dashboard + one worker, SQLite by default
    alphawatch analyze PATH          one checkpoint, no database
    alphawatch watch RUN_DIR...      worker only
    alphawatch serve                 API + dashboard only
    alphawatch gate --url U --run R  exit code for CI
    alphawatch export mlflow|tensorboard|wandb --run R   robust statistics into a tracker
    alphawatch db upgrade | token create|list|revoke | runs list
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alphawatch.settings import Settings
from alphawatch.spreadsheet import write_csv
from alphawatch.text import EscapingFormatter
from alphawatch.vocabulary import MAX_STEP, FitMethod

if TYPE_CHECKING:
    from alphawatch.workers.analyst import AnalysedLayer, AnalysisOptions

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2

_HELP = """\
Watch the heavy-tailed spectral health (weightwatcher alpha) of a model while it trains.

Start here:
  alphawatch up runs/my-model        analyse every checkpoint as it appears and open
                                     the dashboard at http://127.0.0.1:8000/
  alphawatch analyze runs/my-model/checkpoint-500 --format table

Settings come from ALPHAWATCH_* environment variables (ALPHAWATCH_DATABASE_URL,
ALPHAWATCH_DEVICE, ALPHAWATCH_TRUST__ALPHA_MAX, ...); options below override them.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (also used to check docker-compose commands)."""
    parser = argparse.ArgumentParser(
        prog="alphawatch", description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def db_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", type=str, metavar="URL",
                       help="database URL (default: ALPHAWATCH_DATABASE_URL or ./alphawatch.db)")

    def device_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                       help="where eigenvalues are computed (default: auto = GPU when present)")

    def listen_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", type=str, help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=port_number, help="port to listen on (default 8000)")

    def variant_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--optimizer-state", action="store_true", default=None,
                       help="also analyse Adam's exp_avg (gradient average) of each weight "
                            "matrix, as <layer>@exp_avg rows (ALPHAWATCH_OPTIMIZER_STATE)")
        p.add_argument("--nested-widths", type=widths, metavar="K1,K2",
                       help="also analyse MLP matrices cut to their first K neurons, as "
                            "<layer>@w<K> rows (default: ALPHAWATCH_NESTED_WIDTHS, else the "
                            "model config's nested_widths)")

    def poll_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--poll", type=positive, metavar="SECONDS",
                       help="seconds between scans of the run directories (default 5)")

    up = sub.add_parser("up", help="API + dashboard + one worker in one process (the main job)")
    up.add_argument("run_dir", type=Path, nargs="+", metavar="RUN_DIR",
                    help="run directories to watch; the worker reads nothing outside them")
    db_option(up)
    device_option(up)
    listen_options(up)
    poll_option(up)
    variant_options(up)

    watch = sub.add_parser("watch", help="worker only: analyse checkpoints into the database")
    watch.add_argument("run_dir", type=Path, nargs="*", metavar="RUN_DIR",
                       help="run directories; runs registered through the API are watched too")
    db_option(watch)
    device_option(watch)
    poll_option(watch)
    variant_options(watch)
    watch.add_argument("--reanalyze", action="store_true",
                       help="analyse checkpoints again even when results exist")
    watch.add_argument("--once", action="store_true", help="process what is there, then exit")

    serve = sub.add_parser("serve", help="API + dashboard only")
    db_option(serve)
    listen_options(serve)

    analyze = sub.add_parser("analyze", help="analyse one checkpoint, no database")
    analyze.add_argument("path", type=Path, metavar="PATH",
                         help="a checkpoint folder or file (any format alphawatch discovers)")
    device_option(analyze)
    analyze.add_argument("--format", choices=["table", "json", "csv"], default="table",
                         help="output format (default: table)")
    analyze.add_argument("--method", choices=[m.value for m in FitMethod],
                         help="fit method (default: the fit_method setting, ww: weightwatcher's)")
    analyze.add_argument("--engine", choices=["alphawatch", "weightwatcher"],
                         default="alphawatch",
                         help="alphawatch's engine (default), or weightwatcher 0.7.7 itself for "
                              "its exact numbers (crosscheck extra; ww, xmin_peak, clip_xmax)")
    variant_options(analyze)

    gate = sub.add_parser("gate", help="ask the API's CI gate; exit 0 pass, 1 fail, 2 error")
    gate.add_argument("--url", type=str, required=True, help="base URL of the alphawatch API")
    gate.add_argument("--run", type=str, required=True, help="run id or name")
    gate.add_argument("--token", type=str, help="API token when reads need one")
    gate.add_argument("--stat", choices=["median", "mean", "trimmed_mean", "p10", "p25", "p75",
                                         "p90"],
                      help="robust statistic of alpha (default: the run's gate rules)")
    gate.add_argument("--filter", choices=["trusted", "all"],
                      help="layers that count (default: the run's gate rules)")
    gate.add_argument("--step", type=step_number,
                      help="step to judge (default: the latest analysed)")
    gate.add_argument("--ref-step", type=step_number,
                      help="reference step for --max-delta")
    gate.add_argument("--max-alpha", type=float,
                      help="fail above this alpha (default: the run's gate rules)")
    gate.add_argument("--min-alpha", type=float,
                      help="fail below this alpha (default: the run's gate rules)")
    gate.add_argument("--max-untrusted-share", type=share,
                      help="fail when a larger share of layers (0..1) is untrusted")
    gate.add_argument("--max-delta", type=positive,
                      help="fail when alpha moved more than this since --ref-step "
                           "(default: the checkpoint before)")
    gate.add_argument("--variant", type=str,
                      help="weight (default), exp_avg (gradients) or a nested width w<k>")
    gate.add_argument("--method", choices=[m.value for m in FitMethod],
                      help="fit method (default: the server's fit_method)")

    export = sub.add_parser("export", help="log a run's robust statistics to an experiment "
                                           "tracker (again: only what it lacks)")
    export_sub = export.add_subparsers(dest="tracker", required=True, metavar="TRACKER")

    def export_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", type=str, required=True, help="run name (or id)")
        p.add_argument("--layers", action="store_true",
                       help="every layer's alpha too, not only the model-level statistics")
        p.add_argument("--method", choices=[m.value for m in FitMethod],
                       help="fit method (default: the fit_method setting)")
        db_option(p)

    mlflow = export_sub.add_parser("mlflow", help="MLflow: one run per alphawatch run")
    export_options(mlflow)
    mlflow.add_argument("--tracking-uri", type=str, required=True, metavar="URI",
                        help="MLflow tracking URI (sqlite:///mlflow.db, http://mlflow:5000)")
    mlflow.add_argument("--experiment", type=str, default="alphawatch",
                        help="MLflow experiment (default: alphawatch)")
    tensorboard = export_sub.add_parser("tensorboard", help="TensorBoard event files")
    export_options(tensorboard)
    tensorboard.add_argument("--logdir", type=Path, required=True, metavar="DIR",
                             help="TensorBoard folder; the run is written to DIR/<run name>/")
    wandb = export_sub.add_parser("wandb", help="Weights & Biases (WANDB_MODE=offline works)")
    export_options(wandb)
    wandb.add_argument("--project", type=str, default="alphawatch",
                       help="W&B project (default: alphawatch)")
    wandb.add_argument("--entity", type=str, help="W&B entity (default: the user's)")
    wandb.add_argument("--dir", type=Path, help="where W&B keeps its files (default: here)")

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_option(db_sub.add_parser("upgrade", help="migrate the database to the latest schema"))

    token = sub.add_parser("token", help="API tokens (writes always need one)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("name", type=str, help="a name to recognise the token by")
    create.add_argument("--scope", choices=["read", "write", "admin"], default="write",
                        help="read: GETs only; write: also register runs; admin: also delete "
                             "runs (default: write)")
    create.add_argument("--expires-in", type=float, metavar="DAYS",
                        help="refuse the token after this many days (default: never)")
    db_option(create)
    db_option(token_sub.add_parser("list", help="tokens with scope, dates and state "
                                                "(never the secret)"))
    revoke = token_sub.add_parser("revoke", help="refuse a token from its next request on")
    revoke.add_argument("name", type=str, help="the name given at creation")
    db_option(revoke)

    runs = sub.add_parser("runs", help="runs known to the database")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    db_option(runs_sub.add_parser("list", help="list runs"))
    return parser


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share between 0 and 1")
    return value


def widths(text: str) -> list[int]:
    try:
        values = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text} is not a list of positive widths (1024,2048)")
    return values


def step_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_STEP:
        raise argparse.ArgumentTypeError(f"{text} is not a step (0 .. 2^63-1)")
    return value


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0 .. 65535)")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for option, field in (("db", "database_url"), ("device", "device"), ("host", "host"),
                          ("port", "port"), ("poll", "poll_interval_s"),
                          ("optimizer_state", "optimizer_state"),
                          ("nested_widths", "nested_widths")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def _configure_logging(verbose: bool) -> None:
    # Every record is escaped where it is formatted: run and folder names are chosen by
    # whoever writes into a watched directory, and must never print a line of their own.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except _UserError as exc:
        print(f"alphawatch: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


class _UserError(Exception):
    """A mistake the user can fix; printed without a traceback."""


def _check_dirs(paths: Sequence[Path]) -> list[Path]:
    from alphawatch.workers.watcher import RunDirError, check_run_dir

    try:
        return [check_run_dir(p) for p in paths]
    except RunDirError as exc:
        raise _UserError(str(exc)) from exc


def _prepare_database(settings: Settings, *, migrate: bool) -> None:
    from alphawatch.service.db.migrations import SchemaOutOfDate, upgrade, verify_schema
    from alphawatch.service.db.session import make_engine

    if migrate:
        upgrade(settings.database_url)
        return
    try:
        verify_schema(make_engine(settings.database_url))
    except SchemaOutOfDate as exc:
        raise _UserError(str(exc)) from exc


def _is_embedded(settings: Settings) -> bool:
    return settings.database_url.startswith("sqlite")


def _stop_on_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        logging.getLogger("alphawatch").info("signal %s: finishing the job in hand", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _cmd_up(args: argparse.Namespace) -> int:
    import uvicorn

    from alphawatch.service.api import create_app
    from alphawatch.workers.supervisor import Supervisor
    from alphawatch.workers.watcher import Watcher

    dirs = _check_dirs(args.run_dir)
    settings = _settings(args)
    if not settings.allowed_roots:
        # The folders named and nothing above them: `up /runs` must not allow `/`.
        settings = settings.model_copy(update={"allowed_roots": dirs})
    _prepare_database(settings, migrate=True)
    exporter = _exporter(settings)
    watcher = Watcher(settings, dirs, on_analysed=exporter)
    stop = threading.Event()
    # A worker loop that dies is restarted; /health answers 503 until it runs again.
    worker = Supervisor(watcher.run_forever, lambda: watcher.passes, stop,
                        trouble=watcher.health.trouble)
    worker.start()
    print(f"alphawatch: dashboard at http://{settings.host}:{settings.port}/  "
          f"(database {settings.database_url})", flush=True)
    try:
        # log_config=None: uvicorn's records reach the escaping handler of _configure_logging.
        uvicorn.run(create_app(settings, liveness=worker.liveness, bound_host=settings.host),
                    host=settings.host, port=settings.port, log_level="warning", log_config=None)
    finally:
        stop.set()
        worker.join(timeout=60)
        if exporter is not None:
            exporter.close()
    return EXIT_OK


def _cmd_watch(args: argparse.Namespace) -> int:
    from alphawatch.workers.watcher import Watcher

    dirs = _check_dirs(args.run_dir)
    settings = _settings(args)
    _prepare_database(settings, migrate=_is_embedded(settings))
    exporter = _exporter(settings)
    watcher = Watcher(settings, dirs, reanalyze=args.reanalyze, on_analysed=exporter)
    try:
        if args.once:
            count = watcher.run_once()
            print(f"alphawatch: analysed {count} checkpoints")
            return EXIT_OK
        stop = threading.Event()
        _stop_on_signals(stop)
        watcher.run_forever(stop)
    finally:
        if exporter is not None:
            exporter.close()
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from alphawatch.service.api import create_app

    settings = _settings(args)
    _prepare_database(settings, migrate=_is_embedded(settings))
    print(f"alphawatch: API and dashboard at http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run(create_app(settings, bound_host=settings.host), host=settings.host,
                port=settings.port, log_level="warning", log_config=None)
    return EXIT_OK


_COLUMNS = ("name", "shape", "alpha", "D", "xmin", "num_pl_spikes", "fit_status", "trusted")


def analyze_path(path: Path, settings: Settings, method: str | None = None,
                 engine: str = "alphawatch") -> dict[str, Any]:
    """Analyse one checkpoint (no database) into the public ``analyze`` JSON document.

    ``engine="weightwatcher"``: the fit numbers are weightwatcher 0.7.7's own (its ``analyze()``
    on each matrix), with alphawatch's fit rules applied to them; no bootstrap stability, no
    trap search and no distribution tests, which weightwatcher does not compute.
    """
    from alphawatch.service.robust import summarize
    from alphawatch.vocabulary import DEFAULT_VARIANT, split_variant
    from alphawatch.workers.analyst import AnalysisOptions, analysed_layers
    from alphawatch.workers.checkpoints import UNCONFINED, discover
    from alphawatch.workers.spectral import crosscheck

    # The worker's options, less the live cross-check: that samples the stored layers of a
    # run; here ``--engine weightwatcher`` compares every layer, when asked.
    options = replace(AnalysisOptions.from_settings(settings, confine=UNCONFINED, method=method),
                      crosscheck_share=0.0)
    if engine == "weightwatcher" and (reason := crosscheck.unavailable(options.method)):
        raise _UserError(f"--engine weightwatcher: {reason}")
    refs = discover(path, settle_s=0.0) if path.is_dir() else []
    step = next((r.step for r in refs if Path(r.path) == path), None)
    if engine == "weightwatcher":
        layers = _weightwatcher_rows(path, options)
    else:
        layers = [_document_row(layer) for layer in analysed_layers(path, None, options)]
    # The summary is the weights' own: gradients and nested slices are rows beside them.
    weights = [r for r in layers if split_variant(r["name"])[1] == DEFAULT_VARIANT]
    return {"step": step, "path": str(path), "device": str(options.device), "engine": engine,
            "layers": layers, "summary": summarize(weights, thresholds=options.thresholds)}


def _document_row(layer: AnalysedLayer) -> dict[str, Any]:
    """A layer of the ``analyze`` document: every metric, then where the matrix sits."""
    row = layer.result.metrics()
    row.update(name=layer.name, kind=layer.kind, block=layer.block)
    if layer.shape is None:
        # A layer that names no matrix (refused optimizer state) has always been printed with
        # the stored row's fields rather than a shape: the public document keeps its keys.
        row.update(dtype=layer.dtype, distance_from_init=layer.distance_from_init)
    else:
        row.update(shape=list(layer.shape), dtype=layer.dtype)
    return row


def _weightwatcher_rows(path: Path, options: AnalysisOptions) -> list[dict[str, Any]]:
    """weightwatcher's own numbers for each matrix, with alphawatch's fit rules applied."""
    from alphawatch.workers.analyst import analysed_matrices
    from alphawatch.workers.spectral import crosscheck

    refused: list[AnalysedLayer] = []
    layers: list[dict[str, Any]] = []
    for matrix in analysed_matrices(path, options, refused):
        row = crosscheck.weightwatcher_row(matrix.weight, options.method)
        status = crosscheck.status_of(row, options.thresholds)
        row.update(method=str(options.method), fit_status=status.value,
                   trusted=status.value == "ok", name=matrix.name, kind=matrix.kind,
                   block=matrix.block, shape=list(matrix.weight.shape),
                   dtype=str(matrix.stored_dtype).removeprefix("torch."))
        layers.append(row)
    # One pass, one matrix at a time: what was refused was refused after the last matrix.
    return layers + [_document_row(layer) for layer in refused]


def _cmd_analyze(args: argparse.Namespace) -> int:
    from alphawatch.workers.checkpoints import CheckpointError

    path = args.path.expanduser().resolve()
    if not path.exists():
        raise _UserError(f"{path} does not exist")
    try:
        doc = analyze_path(path, _settings(args), args.method, args.engine)
    except CheckpointError as exc:
        raise _UserError(str(exc)) from exc
    out = sys.stdout
    if args.format == "json":
        json.dump(doc, out, indent=2, default=str)
        out.write("\n")
    elif args.format == "csv":
        keys = list(doc["layers"][0]) if doc["layers"] else list(_COLUMNS)
        write_csv(out, keys, doc["layers"])
    else:
        out.write(_table(doc))
    return EXIT_OK


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return "-" if value is None else str(value)


def _table(doc: dict[str, Any]) -> str:
    rows = [[_fmt(layer.get(c)) for c in _COLUMNS] for layer in doc["layers"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(_COLUMNS)]
    buf = io.StringIO()
    buf.write("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)) + "\n")
    for row in rows:
        buf.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + "\n")
    for layer in doc["layers"]:
        if layer.get("fit_status") == "failed" and layer.get("error"):
            # A refused optimizer state (or a matrix that failed) says why, not only "failed".
            buf.write(f"{layer['name']}: {layer['error']}\n")
    summary = doc["summary"]
    buf.write(f"\nstep {doc['step']}: {json.dumps(summary, default=str)}\n")
    return buf.getvalue()


def _cmd_gate(args: argparse.Namespace) -> int:
    # Imported here: http.client and email cost ~20 ms that no other command needs.
    from alphawatch.integrations.link import Client, LinkError

    params = {}
    for name in ("stat", "filter", "step", "ref_step", "max_alpha", "min_alpha",
                 "max_untrusted_share", "max_delta", "variant", "method"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    # The training callbacks' client: one way to call the API, and a run found on any page.
    client = Client(args.url, args.token, timeout_s=30.0)
    try:
        if str(args.run).isdigit():
            run_id = int(args.run)
        else:
            found = client.find(str(args.run))
            if found is None:
                print(f"alphawatch gate: no run named {args.run!r} at {client.base}",
                      file=sys.stderr)
                return EXIT_ERROR
            run_id = found.id
        verdict = client.gate(run_id, params)
    except LinkError as exc:
        print(f"alphawatch gate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(verdict, indent=2))
    if verdict.get("passed"):
        return EXIT_OK
    for violation in verdict.get("violations", []):
        print(f"gate: {violation.get('message', violation)}", file=sys.stderr)
    return EXIT_FAIL


def _cmd_export(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from alphawatch.integrations.export import (
        MlflowTarget,
        Target,
        TensorBoardTarget,
        WandbTarget,
        export_run,
    )
    from alphawatch.integrations.export.trackers import TrackerMissing
    from alphawatch.service.db.models import Run
    from alphawatch.service.db.session import make_engine, session_scope

    settings = _settings(args)
    _prepare_database(settings, migrate=False)
    target: Target
    if args.tracker == "mlflow":
        target = MlflowTarget(args.tracking_uri, args.experiment)
    elif args.tracker == "tensorboard":
        target = TensorBoardTarget(args.logdir.expanduser().resolve())
    else:
        target = WandbTarget(args.project, args.entity,
                             args.dir.expanduser().resolve() if args.dir else None)
    with session_scope(make_engine(settings.database_url)) as session:
        query = select(Run).where(Run.name == args.run)
        run = session.scalars(query).first()
        if run is None and args.run.isdigit():
            run = session.get(Run, int(args.run))
        if run is None:
            raise _UserError(f"no run named {args.run!r} in {settings.database_url}")
        try:
            tracker = target.open(run.name)
            try:
                count = export_run(session=session, run_id=run.id, tracker=tracker,
                                   thresholds=settings.trust,
                                   method=args.method or settings.fit_method,
                                   layers=args.layers)
            finally:
                tracker.close()
                target.shutdown()
        except TrackerMissing as exc:
            raise _UserError(str(exc)) from exc
        except Exception as exc:  # each tracker raises its own types (MlflowException, ...)
            raise _UserError(f"export to {args.tracker} failed: {type(exc).__name__}: "
                             f"{exc}") from exc
        print(f"alphawatch: logged {count} new values of run {run.name!r} to {args.tracker}")
    return EXIT_OK


def _exporter(settings: Settings) -> Any:
    """The worker's continuous export when ``ALPHAWATCH_EXPORT__*`` names a target, else None."""
    from alphawatch.integrations.export.continuous import ContinuousExport

    exporter = ContinuousExport(settings)
    return exporter if exporter.targets else None


def _cmd_db(args: argparse.Namespace) -> int:
    from alphawatch.service.db.migrations import upgrade

    settings = _settings(args)
    upgrade(settings.database_url)
    print(f"alphawatch: {settings.database_url} is at the latest schema")
    return EXIT_OK


def _cmd_token(args: argparse.Namespace) -> int:
    from alphawatch.service.db import tokens
    from alphawatch.service.db.session import make_engine, session_scope

    settings = _settings(args)
    _prepare_database(settings, migrate=_is_embedded(settings))
    try:
        with session_scope(make_engine(settings.database_url)) as session:
            if args.token_command == "create":
                print(tokens.create_token(session, name=args.name,
                                          scope=tokens.TokenScope(args.scope),
                                          expires_in_days=args.expires_in))
            elif args.token_command == "revoke":
                count = tokens.revoke_token(session, name=args.name)
                print(f"alphawatch: revoked {count} token(s) named {args.name!r}")
            else:
                _print_tokens(tokens.list_tokens(session))
    except tokens.TokenError as exc:
        raise _UserError(str(exc)) from exc
    return EXIT_OK


def _print_tokens(found: Sequence[Any]) -> None:
    from datetime import UTC, datetime

    now = datetime.now(UTC)

    def when(moment: datetime | None) -> str:
        return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "-"

    rows = [("NAME", "SCOPE", "CREATED", "LAST USED", "EXPIRES", "STATE")]
    for t in found:
        state = ("revoked" if t.revoked_at is not None else
                 "expired" if t.expires_at is not None and t.expires_at <= now else "active")
        rows.append((t.name, str(t.scope), when(t.created_at), when(t.last_used_at),
                     when(t.expires_at), state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cmd_runs(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from alphawatch.service.db.models import Run
    from alphawatch.service.db.session import make_engine, session_scope

    settings = _settings(args)
    _prepare_database(settings, migrate=False)
    with session_scope(make_engine(settings.database_url)) as session:
        for run in session.scalars(select(Run).order_by(Run.id)):
            print(f"{run.id}\t{run.name}\t{run.path}")
    return EXIT_OK


_COMMANDS = {
    "up": _cmd_up, "watch": _cmd_watch, "serve": _cmd_serve, "analyze": _cmd_analyze,
    "gate": _cmd_gate, "export": _cmd_export, "db": _cmd_db, "token": _cmd_token, "runs": _cmd_runs,
}

if __name__ == "__main__":
    raise SystemExit(main())
