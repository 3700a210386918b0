"""The argument parser of every subcommand, and the option types it checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from alphawatch.locations import ObjectURL, location
from alphawatch.vocabulary import MAX_STEP, FitMethod

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
        p.add_argument(
            "--db",
            type=str,
            metavar="URL",
            help="database URL (default: ALPHAWATCH_DATABASE_URL or ./alphawatch.db)",
        )

    def device_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device",
            choices=["auto", "cpu", "cuda"],
            help="where eigenvalues are computed (default: auto = GPU when present)",
        )

    def listen_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", type=str, help="address to listen on (default 127.0.0.1)")
        p.add_argument("--port", type=port_number, help="port to listen on (default 8000)")

    def variant_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--optimizer-state",
            action="store_true",
            default=None,
            help="also analyse Adam's exp_avg (gradient average) of each weight "
            "matrix, as <layer>@exp_avg rows (ALPHAWATCH_OPTIMIZER_STATE)",
        )
        p.add_argument(
            "--nested-widths",
            type=widths,
            metavar="K1,K2",
            help="also analyse MLP matrices cut to their first K neurons, as "
            "<layer>@w<K> rows (default: ALPHAWATCH_NESTED_WIDTHS, else the "
            "model config's nested_widths)",
        )

    def keep_up_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--keep-up",
            type=backlog_bound,
            metavar="N",
            help="keep at most N checkpoints of each run queued (newest, first, middle, "
            "quarters … first) and mark the rest skipped, for workers that cannot analyse "
            "every checkpoint; 0: off, skipped ones are queued again (ALPHAWATCH_KEEP_UP)",
        )

    def deltas_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--deltas",
            type=deltas,
            metavar="init,prev",
            help="also analyse the update W - W_0 since the run's first checkpoint (init, "
            "<layer>@delta_init rows) and W - W_prev since the checkpoint before by step (prev, "
            "<layer>@delta_prev rows and layer distances); 'distances' for the distances alone "
            "(default: ALPHAWATCH_DELTAS)",
        )

    def poll_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--poll",
            type=positive,
            metavar="SECONDS",
            help="seconds between scans of the run directories (default 5)",
        )

    up = sub.add_parser("up", help="API + dashboard + one worker in one process (the main job)")
    up.add_argument(
        "run_dir",
        type=run_location,
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (or s3://, gs:// URLs) to watch; the worker reads nothing "
        "outside them",
    )
    db_option(up)
    device_option(up)
    listen_options(up)
    poll_option(up)
    variant_options(up)
    keep_up_option(up)
    deltas_option(up)

    watch = sub.add_parser("watch", help="worker only: analyse checkpoints into the database")
    watch.add_argument(
        "run_dir",
        type=run_location,
        nargs="*",
        metavar="RUN_DIR",
        help="run directories or s3://, gs:// URLs; runs registered through the API are "
        "watched too",
    )
    db_option(watch)
    device_option(watch)
    poll_option(watch)
    variant_options(watch)
    keep_up_option(watch)
    deltas_option(watch)
    watch.add_argument(
        "--reanalyze", action="store_true", help="analyse checkpoints again even when results exist"
    )
    modes = watch.add_mutually_exclusive_group()
    modes.add_argument("--once", action="store_true", help="process what is there, then exit")
    modes.add_argument(
        "--discover-only",
        action="store_true",
        help="register checkpoints and queue their jobs, analyse nothing (no GPU, no torch): "
        "keeps the queue filled while a scaler has stopped every GPU worker",
    )
    watch.add_argument(
        "--max-jobs",
        type=positive_int,
        metavar="N",
        help="exit (status 0) after analysing N checkpoints (done or failed)",
    )
    watch.add_argument(
        "--exit-when-idle",
        type=non_negative,
        metavar="SECONDS",
        help="exit (status 0) once nothing has been claimable for SECONDS",
    )
    watch.add_argument(
        "--health-port",
        type=port_number,
        metavar="PORT",
        help="answer GET /health on this port (200, or 503 with the reason while a loop of "
        "the worker keeps failing): a liveness probe for schedulers",
    )

    serve = sub.add_parser("serve", help="API + dashboard only")
    db_option(serve)
    listen_options(serve)

    analyze = sub.add_parser("analyze", help="analyse one checkpoint, no database")
    analyze.add_argument(
        "path",
        type=run_location,
        metavar="PATH",
        help="a checkpoint folder or file (any format alphawatch discovers), or its s3:// or "
        "gs:// URL",
    )
    device_option(analyze)
    analyze.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="output format (default: table)",
    )
    analyze.add_argument(
        "--method",
        choices=[m.value for m in FitMethod],
        help="fit method (default: the fit_method setting, ww: weightwatcher's)",
    )
    analyze.add_argument(
        "--engine",
        choices=["alphawatch", "weightwatcher"],
        default="alphawatch",
        help="alphawatch's engine (default), or weightwatcher 0.7.7 itself for "
        "its exact numbers (crosscheck extra; ww, xmin_peak, clip_xmax)",
    )
    variant_options(analyze)
    analyze.add_argument(
        "--base",
        type=Path,
        metavar="BASE_CKPT",
        help="also analyse the update W - W_base of each matrix against this checkpoint "
        "(<layer>@delta rows), and give each weight its distances from it",
    )

    gate = sub.add_parser("gate", help="ask the API's CI gate; exit 0 pass, 1 fail, 2 error")
    gate.add_argument("--url", type=str, required=True, help="base URL of the alphawatch API")
    gate.add_argument("--run", type=str, required=True, help="run id or name")
    gate.add_argument("--token", type=str, help="API token when reads need one")
    gate.add_argument(
        "--stat",
        choices=["median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90"],
        help="robust statistic of alpha (default: the run's gate rules)",
    )
    gate.add_argument(
        "--filter",
        choices=["trusted", "all"],
        help="layers that count (default: the run's gate rules)",
    )
    gate.add_argument(
        "--step", type=step_number, help="step to judge (default: the latest analysed)"
    )
    gate.add_argument("--ref-step", type=step_number, help="reference step for --max-delta")
    gate.add_argument(
        "--max-alpha", type=float, help="fail above this alpha (default: the run's gate rules)"
    )
    gate.add_argument(
        "--min-alpha", type=float, help="fail below this alpha (default: the run's gate rules)"
    )
    gate.add_argument(
        "--max-untrusted-share",
        type=share,
        help="fail when a larger share of layers (0..1) is untrusted",
    )
    gate.add_argument(
        "--max-delta",
        type=positive,
        help="fail when alpha moved more than this since --ref-step "
        "(default: the checkpoint before)",
    )
    gate.add_argument(
        "--variant", type=str, help="weight (default), exp_avg (gradients) or a nested width w<k>"
    )
    gate.add_argument(
        "--method",
        choices=[m.value for m in FitMethod],
        help="fit method (default: the server's fit_method)",
    )

    gate.add_argument(
        "--wait",
        action="store_true",
        help="wait until the step (--step, else any) is analysed or the run moved past it",
    )
    gate.add_argument(
        "--timeout",
        type=positive,
        default=3600.0,
        help="with --wait: give up after this many seconds, exit 2 (default 3600)",
    )

    export = sub.add_parser(
        "export",
        help="log a run's robust statistics to an experiment tracker (again: only what it lacks)",
    )
    export_sub = export.add_subparsers(dest="tracker", required=True, metavar="TRACKER")

    def export_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", type=str, required=True, help="run name (or id)")
        p.add_argument(
            "--layers",
            action="store_true",
            help="every layer's alpha too, not only the model-level statistics",
        )
        p.add_argument(
            "--method",
            choices=[m.value for m in FitMethod],
            help="fit method (default: the fit_method setting)",
        )
        db_option(p)

    mlflow = export_sub.add_parser("mlflow", help="MLflow: one run per alphawatch run")
    export_options(mlflow)
    mlflow.add_argument(
        "--tracking-uri",
        type=str,
        required=True,
        metavar="URI",
        help="MLflow tracking URI (sqlite:///mlflow.db, http://mlflow:5000)",
    )
    mlflow.add_argument(
        "--experiment",
        type=str,
        default="alphawatch",
        help="MLflow experiment (default: alphawatch)",
    )
    tensorboard = export_sub.add_parser("tensorboard", help="TensorBoard event files")
    export_options(tensorboard)
    tensorboard.add_argument(
        "--logdir",
        type=Path,
        required=True,
        metavar="DIR",
        help="TensorBoard folder; the run is written to DIR/<run name>/",
    )
    wandb = export_sub.add_parser("wandb", help="Weights & Biases (WANDB_MODE=offline works)")
    export_options(wandb)
    wandb.add_argument(
        "--project", type=str, default="alphawatch", help="W&B project (default: alphawatch)"
    )
    wandb.add_argument("--entity", type=str, help="W&B entity (default: the user's)")
    wandb.add_argument("--dir", type=Path, help="where W&B keeps its files (default: here)")

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_option(db_sub.add_parser("upgrade", help="migrate the database to the latest schema"))
    depth = db_sub.add_parser(
        "queue-depth",
        help="print how many jobs a worker could claim (alphawatch_queue_depth): what a "
        "scaler starts GPU workers for",
    )
    depth.add_argument(
        "--sql",
        action="store_true",
        help="print the query instead (PostgreSQL; the query of KEDA's postgresql trigger)",
    )
    db_option(depth)

    token = sub.add_parser("token", help="API tokens (writes always need one)")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("name", type=str, help="a name to recognise the token by")
    create.add_argument(
        "--scope",
        choices=["read", "write", "admin"],
        default="write",
        help="read: GETs only; write: also register runs; admin: also delete runs (default: write)",
    )
    create.add_argument(
        "--expires-in",
        type=float,
        metavar="DAYS",
        help="refuse the token after this many days (default: never)",
    )
    db_option(create)
    db_option(
        token_sub.add_parser("list", help="tokens with scope, dates and state (never the secret)")
    )
    revoke = token_sub.add_parser("revoke", help="refuse a token from its next request on")
    revoke.add_argument("name", type=str, help="the name given at creation")
    db_option(revoke)

    runs = sub.add_parser("runs", help="runs known to the database")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="ACTION")
    db_option(runs_sub.add_parser("list", help="list runs"))
    return parser


def run_location(text: str) -> Path | ObjectURL:
    """A run folder's path, or an object-store URL in normal form."""
    try:
        return location(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds >= 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
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


def backlog_bound(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value != 0 and not 3 <= value <= 10000:
        raise argparse.ArgumentTypeError("0 (off) or a number of checkpoints from 3 to 10000")
    return value


def deltas(text: str) -> list[str]:
    chosen = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in chosen if d not in ("init", "prev", "distances")]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of init, prev, distances, got {text!r}"
        )
    return chosen


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
