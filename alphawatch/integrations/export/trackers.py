"""The trackers alphawatch exports to: MLflow, TensorBoard, Weights & Biases.

Each target opens one tracker run per alphawatch run (found again by name, so a second export
extends the first) and can say which (key, step) pairs that run holds already: MLflow and W&B by
reading the tracker's own history back, TensorBoard by reading the event files in its folder.
The tracker libraries are optional (``pip install 'alphawatch[integrations]'``) and imported
only when a target is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from alphawatch.integrations.export.points import PREFIX
from alphawatch.run_names import folder_name
from alphawatch.settings import ExportSettings

RUN_TAG = "alphawatch.run"
STEP_KEY = f"{PREFIX}/step"


class TrackerRun(Protocol):
    """One run in a tracker, open for reading back and logging."""

    def logged(self, keys: Sequence[str]) -> dict[str, set[int]]:
        """The steps at which each of ``keys`` is logged already."""
        ...

    def log(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` at training step ``step``."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class Target(Protocol):
    """A tracker to export to; ``open`` finds or creates the run named after the alphawatch run."""

    kind: str

    def open(self, run_name: str) -> TrackerRun: ...

    def shutdown(self) -> None:
        """After the last run is closed: wait for what the tracker still writes."""
        ...


class TrackerMissing(RuntimeError):
    """The tracker's library is not installed."""


def _require(module: str, extra: str = "integrations") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TrackerMissing(
            f"{module} is not installed: pip install 'alphawatch[{extra}]'"
        ) from exc


# -- MLflow -----------------------------------------------------------------------------------

# MLflow accepts letters, digits, '_', '-', '.', ' ', ':' and '/' in metric keys.
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. :/]")


class MlflowTarget:
    """An MLflow tracking server or store (``sqlite:///mlflow.db``, ``http://mlflow:5000``...).

    The run is the one tagged ``alphawatch.run=<name>`` in the experiment, created when missing.
    """

    kind = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str = "alphawatch") -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment

    def open(self, run_name: str) -> MlflowRun:
        tracking = _require("mlflow.tracking")
        client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(self.experiment)
        )
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1
        )
        run_id = (
            found[0].info.run_id
            if found
            else client.create_run(
                experiment_id, run_name=run_name, tags={RUN_TAG: run_name}
            ).info.run_id
        )
        return MlflowRun(client, run_id)

    def shutdown(self) -> None:
        pass


class MlflowRun:
    # MLflow's log_batch takes at most 1000 metrics per call.
    BATCH = 1000

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._pending: list[Any] = []

    def logged(self, keys: Sequence[str]) -> dict[str, set[int]]:
        present = set(self.client.get_run(self.run_id).data.metrics)
        out: dict[str, set[int]] = {}
        for key in keys:
            safe = _MLFLOW_UNSAFE.sub("_", key)
            if safe in present:
                out[key] = {int(m.step) for m in self.client.get_metric_history(self.run_id, safe)}
        return out

    def log(self, step: int, values: dict[str, float]) -> None:
        metric = _require("mlflow.entities").Metric
        now = int(time.time() * 1000)
        self._pending += [
            metric(_MLFLOW_UNSAFE.sub("_", k), v, now, step) for k, v in values.items()
        ]
        if len(self._pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.BATCH], self._pending[self.BATCH :]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


# -- TensorBoard ------------------------------------------------------------------------------


class TensorBoardTarget:
    """Event files under ``logdir/<run name>/`` (:func:`~alphawatch.run_names.folder_name`),
    one scalar tag per key."""

    kind = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        self.logdir = Path(logdir)

    def open(self, run_name: str) -> TensorBoardRun:
        # The name becomes a path: one safe component (a run named '..' from before names were
        # checked gets a folder of its own), and the result checked to lie in the logdir.
        root = self.logdir.resolve()
        folder = (root / folder_name(run_name)).resolve()
        if folder.parent != root:
            raise ValueError(
                f"the TensorBoard folder of run {run_name!r} would be {folder}, "
                f"not a folder of the logdir {root}"
            )
        return TensorBoardRun(folder)

    def shutdown(self) -> None:
        pass


class TensorBoardRun:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._writer: Any = None

    def logged(self, keys: Sequence[str]) -> dict[str, set[int]]:
        if not self.folder.is_dir():
            return {}
        wanted = set(keys)
        return {k: v for k, v in read_scalars(self.folder).items() if k in wanted}

    def log(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            writer = _require("torch.utils.tensorboard").SummaryWriter
            self._writer = writer(log_dir=str(self.folder))
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(folder: Path) -> dict[str, set[int]]:
    """Steps of every scalar tag in the event files of ``folder`` (all of them, in order)."""
    accumulator = _require("tensorboard.backend.event_processing.event_accumulator")
    # No purging: a step logged after a larger one (a checkpoint analysed late) is a point of
    # its own, not a sign that the writer restarted.
    events = accumulator.EventAccumulator(
        str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False
    )
    events.Reload()
    return {tag: {int(e.step) for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


# -- Weights & Biases -------------------------------------------------------------------------


class WandbTarget:
    """A W&B project; the run's id is derived from the alphawatch run's name, so a second
    export resumes it. In offline mode (``WANDB_MODE=offline``) the run is written under
    ``dir/wandb/`` for ``wandb sync``; what earlier exports logged is read back from there.

    Every key is plotted against ``alphawatch/step`` (the training step): W&B's own step must
    only grow, and a checkpoint may be analysed after a later one.
    """

    kind = "wandb"

    def __init__(
        self, project: str = "alphawatch", entity: str | None = None, directory: Path | None = None
    ) -> None:
        self.project = project
        self.entity = entity
        self.directory = Path(directory) if directory is not None else Path.cwd()

    def open(self, run_name: str) -> WandbRun:
        wandb = _require("wandb")
        run_id = wandb_run_id(run_name)
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
        logged = (
            read_offline(self.directory, run_id) if offline else self._read_online(wandb, run_id)
        )

        def start() -> Any:
            # Only once there is something to log: an export that adds nothing leaves no
            # trace, not even an empty offline run.
            self.directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.project,
                entity=self.entity,
                id=run_id,
                name=run_name,
                resume="allow",
                dir=str(self.directory),
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True),
            )
            run.define_metric(STEP_KEY)
            run.define_metric(f"{PREFIX}/*", step_metric=STEP_KEY)
            return run

        return WandbRun(start, logged)

    def shutdown(self) -> None:
        # A finished run's records may still be on their way to disk in W&B's service process;
        # its teardown waits for them (a later export reads them back).
        import sys

        if "wandb" in sys.modules:
            sys.modules["wandb"].teardown()

    def _read_online(self, wandb: Any, run_id: str) -> dict[str, set[int]]:
        api = wandb.Api()
        path = f"{self.entity or api.default_entity}/{self.project}/{run_id}"
        try:
            run = api.run(path)
        except (wandb.errors.CommError, ValueError):  # no such run yet
            return {}
        logged: dict[str, set[int]] = defaultdict(set)
        for row in run.scan_history():
            _collect(row, logged)
        return dict(logged)


def wandb_run_id(run_name: str) -> str:
    """A W&B run id that is the same for every export of the run called ``run_name``."""
    return "aw-" + hashlib.sha1(run_name.encode()).hexdigest()[:16]


class WandbRun:
    def __init__(self, start: Any, logged: dict[str, set[int]]) -> None:
        self._start = start
        self.run: Any = None
        self._logged = logged

    def logged(self, keys: Sequence[str]) -> dict[str, set[int]]:
        return {k: self._logged[k] for k in keys if k in self._logged}

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.run is None:
            self.run = self._start()
        self.run.log({STEP_KEY: step, **values})
        for key in values:
            self._logged.setdefault(key, set()).add(step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _collect(row: dict[str, Any], logged: dict[str, set[int]]) -> None:
    step = row.get(STEP_KEY)
    if step is None:
        return
    for key, value in row.items():
        if key.startswith(PREFIX + "/") and key != STEP_KEY and value is not None:
            logged[key].add(int(step))


def read_offline(directory: Path, run_id: str) -> dict[str, set[int]]:
    """What the offline runs of ``run_id`` under ``directory/wandb`` hold, by key."""
    protocol = _require("wandb.proto.wandb_internal_pb2")
    logged: dict[str, set[int]] = defaultdict(set)
    for path in offline_runs(directory, run_id):
        for data in wandb_records(path / f"run-{run_id}.wandb"):
            record = protocol.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {
                (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                for item in record.history.item
            }
            _collect(row, logged)
    return dict(logged)


def offline_runs(directory: Path, run_id: str) -> list[Path]:
    """The offline run folders of ``run_id``, oldest first (``offline-run-<time>-<id>[-<n>]``,
    the suffix added when two start in the same second)."""
    own = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    folder = directory / "wandb"
    found = (
        [p for p in folder.glob("offline-run-*") if own.fullmatch(p.name)]
        if folder.is_dir()
        else []
    )
    return sorted(p for p in found if (p / f"run-{run_id}.wandb").is_file())


# W&B's transaction log (``run-<id>.wandb``) is LevelDB's log format after a 7-byte header:
# 32 KiB blocks of records, each with a 7-byte header (checksum u32, length u16, type u8), a
# record split over blocks as FIRST, MIDDLE..., LAST. The wandb package reads it only in its Go
# core, so it is read here.
_WANDB_HEADER = b":W&B"
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log, in order; a torn tail (a live run) is dropped."""
    raw = path.read_bytes()
    if raw[:4] != _WANDB_HEADER:
        raise ValueError(f"{path} is not a W&B run file")
    records: list[bytes] = []
    parts: list[bytes] = []
    at = 7
    while at + 7 <= len(raw):
        left = _BLOCK - at % _BLOCK
        if left < 7:  # the block's tail is padding
            at += left
            continue
        length = int.from_bytes(raw[at + 4 : at + 6], "little")
        kind = raw[at + 6]
        body = raw[at + 7 : at + 7 + length]
        if len(body) < length or kind == 0:
            break
        at += 7 + length
        if kind == _FULL:
            records.append(body)
        elif kind == _FIRST:
            parts = [body]
        elif kind == _MIDDLE:
            parts.append(body)
        elif kind == _LAST:
            records.append(b"".join([*parts, body]))
            parts = []
    return records


def targets_of(settings: ExportSettings) -> list[Target]:
    """The targets the ``ALPHAWATCH_EXPORT__*`` settings name (none by default)."""
    targets: list[Target] = []
    if settings.mlflow_tracking_uri:
        targets.append(MlflowTarget(settings.mlflow_tracking_uri, settings.mlflow_experiment))
    if settings.tensorboard_logdir is not None:
        targets.append(TensorBoardTarget(settings.tensorboard_logdir))
    if settings.wandb_project:
        targets.append(
            WandbTarget(settings.wandb_project, settings.wandb_entity, settings.wandb_dir)
        )
    return targets
