"""Generated hostile run folders under a real worker: it lives, and reads nothing it must not.

Hypothesis builds run folders out of hostile entries (checkpoints whose files lie about their
sizes, are cut short, declare huge headers or nest them past the recursion limit, hold code,
link out of the root to a FIFO or a secret model or through a chain of links, are FIFOs or
empty, nest folders past the walk's bound, change while they are read; safetensors headers of
every size up to discovery's cap, and headers, shard indexes and markers past it; names with
control characters, unicode digits, ``@``, ``..``, spreadsheet formulas, up to the file
system's 255 bytes) beside a good run. One real ``alphawatch watch`` process (its real
analysis process, SQLite) watches them, and for every example:

- the worker is alive at the end and exits cleanly on SIGTERM;
- the good run is fully analysed (as many ``done`` checkpoints as were written);
- nothing outside the allowed root is read: inotify on the folders outside reports no read
  (``IN_ACCESS``) of any file there, a FIFO outside would hang a reader that opened it
  blocking, and no layer of the secret model outside exists; a pickle's code never ran;
- every bad entry is visible: a failed checkpoint with its error, or the run's
  ``discovery_error`` naming it (escaped);
- the worker's peak RSS (VmHWM) stays under the documented 1 GiB.

Deterministic (``derandomize``) and small: a few examples with many entries each.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from alphawatch.service.db import registry
from alphawatch.service.db.migrations import upgrade
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.text import printable
from alphawatch.workers.checkpoints.completeness import PARSE_MAX
from alphawatch.workers.checkpoints.discovery import _ignored
from alphawatch.workers.checkpoints.tree import MAX_DEPTH
from tests.db import rows
from tests.workers import hostile

ROOT = Path(__file__).resolve().parents[2]
PEAK_RSS_BOUND_MB = 1024  # docs/OPERATIONS.md: the worker stays under 1 GiB
GOOD_STEPS = (10, 20, 30)
_UP = "model.layers.0.mlp.up_proj.weight"


def _matrices(seed: int, prefix: str = "model") -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        f"{prefix}.layers.{i}.mlp.up_proj.weight": g.standard_normal((48, 24), np.float32)
        for i in range(2)
    }


def _hf(folder: Path, step: int, seed: int = 0) -> Path:
    """A small, real, complete Hugging Face-style checkpoint."""
    folder.mkdir(parents=True)
    save_file(_matrices(seed), str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _marker(folder: Path, step: int) -> None:
    # Every hostile checkpoint carries its producer's marker: a broken shard without one
    # cannot be told from a shard still being written, and is waited for (by design).
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def _header_file(path: Path, length: int) -> None:
    """A valid safetensors file whose header is exactly ``length`` bytes (space padded, as
    the format allows): one real matrix and as many 1-element tensors as fit."""
    entries = [f'"{_UP}":{{"dtype":"F32","shape":[8,4],"data_offsets":[0,128]}}']
    offset, size = 128, len(entries[0]) + 2
    while True:
        entry = f'"t.{offset}":{{"dtype":"F32","shape":[1],"data_offsets":[{offset},{offset + 4}]}}'
        if size + len(entry) + 1 > length:
            break
        entries.append(entry)
        size += len(entry) + 1
        offset += 4
    raw = ("{" + ",".join(entries) + "}").encode()
    raw += b" " * (length - len(raw))
    data = np.random.default_rng(0).standard_normal(32, np.float32).tobytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data + b"\0" * (offset - 128))


class _Inotify:
    """Reads (``IN_ACCESS``) of the files in some folders, through the kernel's inotify.

    A file read through a descriptor (``read``) raises ``IN_ACCESS`` whoever reads it; a
    ``stat``, a ``realpath`` or a non-blocking open that is refused before reading raise none.
    """

    IN_ACCESS = 0x1
    IN_NONBLOCK = 0o4000

    def __init__(self, folders: list[Path]) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names: dict[int, Path] = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_ACCESS)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = folder

    def reads(self) -> list[Path]:
        found: list[Path] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            at = 0
            while at < len(data):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, at)
                name = data[at + 16 : at + 16 + length].rstrip(b"\0")
                found.append(self.names[wd] / os.fsdecode(name))
                at += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Outside:
    """Beside the root, never to be read: a secret model, a FIFO, a folder holding a FIFO."""

    base: Path
    secret: Path = field(init=False)
    fifo: Path = field(init=False)
    fifo_dir: Path = field(init=False)
    pwned: Path = field(init=False)

    def __post_init__(self) -> None:
        self.secret = self.base / "secret" / "checkpoint-1"
        self.secret.mkdir(parents=True)
        save_file(_matrices(7, "secret"), str(self.secret / "model.safetensors"))
        _marker(self.secret, 1)
        self.fifo = self.base / "fifo"
        os.mkfifo(self.fifo)
        self.fifo_dir = self.base / "fifo-dir"
        self.fifo_dir.mkdir()
        os.mkfifo(self.fifo_dir / "model.safetensors")
        _marker(self.fifo_dir, 1)
        self.pwned = self.base / "pwned"

    def folders(self) -> list[Path]:
        return [self.base, self.secret.parent, self.secret, self.fifo_dir]


@dataclass
class Scene:
    """One generated run folder and what the worker must show for it."""

    run: Path
    outside: Outside
    failed: dict[int, str] = field(default_factory=dict)  # step -> words its error holds
    done: set[int] = field(default_factory=set)  # steps that must be analysed
    finished: set[int] = field(default_factory=set)  # steps that must end done or failed
    run_error: list[str] = field(default_factory=list)  # words the run's error holds
    changing: list[Path] = field(default_factory=list)  # files appended to while watched


def _build_entry(scene: Scene, kind: str, step: int, size: int) -> None:
    """One hostile checkpoint ``checkpoint-<step>`` (or the like) of the given kind."""
    run, out = scene.run, scene.outside
    folder = run / f"checkpoint-{step}"
    if kind == "lying sizes":
        hostile.lying_safetensors(run, step)
        _marker(folder, step)
        scene.failed[step] = "header lies"
    elif kind == "overlapping offsets":
        hostile.overlapping_safetensors(run, step)
        _marker(folder, step)
        scene.failed[step] = "overlaps"
    elif kind == "truncated":
        _hf(folder, step)
        whole = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(whole[: size % max(len(whole) - 1, 1)])
        scene.failed[step] = "model.safetensors"
    elif kind == "huge declared header":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**40 + size) + b"{}")
        _marker(folder, step)
        scene.failed[step] = "bad header length"
    elif kind == "header over the cap":
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(
            struct.pack("<Q", PARSE_MAX + 1 + size) + b" " * 64
        )
        _marker(folder, step)
        scene.failed[step] = "that discovery parses"
    elif kind == "header up to the cap":
        folder.mkdir()
        # Every length from a few hundred bytes to the cap itself.
        _header_file(folder / "model.safetensors", 256 + (size * (PARSE_MAX - 256) >> 20))
        _marker(folder, step)
        scene.done.add(step)
    elif kind == "shard index over the cap":
        _hf(folder, step)
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        index = json.dumps({"weight_map": {_UP: "model-00001-of-00001.safetensors"}})
        (folder / "model.safetensors.index.json").write_text(
            index + " " * (PARSE_MAX + 1 + size % 4096 - len(index))
        )
        scene.failed[step] = "larger than"
    elif kind == "marker over the cap":
        _hf(folder, step)
        state = json.dumps({"global_step": step})
        (folder / "trainer_state.json").write_text(
            state + " " * (PARSE_MAX + 1 + size % 4096 - len(state))
        )
        scene.done.add(step)  # not parsed: complete once its files settled
    elif kind == "header nested past the recursion limit":
        folder.mkdir()
        raw = b"[" * (2000 + size % 100_000)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        _marker(folder, step)
        scene.failed[step] = "RecursionError"
    elif kind == "weight behind a chain of links":
        _hf(folder, step)
        links = folder / "links"
        links.mkdir()
        (folder / "model.safetensors").rename(links / "0")
        count = 50 + size % 1100  # past the kernel's 40 hops, and past Python's recursion
        for i in range(1, count):
            (links / str(i)).symlink_to(links / str(i - 1))
        (folder / "model.safetensors").symlink_to(links / str(count - 1))
        scene.failed[step] = ""  # whatever the reason given, it is given
    elif kind == "pickle holding code":
        folder.mkdir()

        class Payload:
            def __reduce__(self) -> tuple[object, ...]:
                return (os.system, (f"touch {out.pwned}",))

        hostile._torch_zip(folder / "pytorch_model.bin", pickle.dumps({_UP: Payload()}))
        _marker(folder, step)
        scene.failed[step] = "refused"
    elif kind == "lying torch storage":
        hostile.lying_torch_storage(run, step)
        _marker(folder, step)
        scene.failed[step] = "lies about its size"
    elif kind == "weight linked to a FIFO outside":
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(out.fifo)
        _marker(folder, step)
        scene.failed[step] = "outside the allowed roots"
    elif kind == "weight linked to a secret outside":
        folder.mkdir()
        (folder / "model.safetensors").symlink_to(out.secret / "model.safetensors")
        _marker(folder, step)
        scene.failed[step] = "outside the allowed roots"
    elif kind == "folder linked outside":
        folder.symlink_to(out.secret if size % 2 else out.fifo_dir, target_is_directory=True)
        scene.failed[step] = "outside the allowed roots"
    elif kind == "config linked to a FIFO outside":
        _hf(folder, step)
        (folder / "config.json").symlink_to(out.fifo)
        scene.failed[step] = "config.json"
    elif kind == "marker linked to a FIFO outside":
        _hf(folder, step)
        (folder / "trainer_state.json").unlink()
        (folder / "trainer_state.json").symlink_to(out.fifo)
        scene.failed[step] = "trainer_state.json"
    elif kind == "FIFO as the weight file":
        folder.mkdir()
        os.mkfifo(folder / "model.safetensors")
        _marker(folder, step)
        scene.failed[step] = "no weight"
    elif kind == "empty weight file":
        folder.mkdir()
        (folder / "model.safetensors").touch()
        _marker(folder, step)
        scene.failed[step] = "model.safetensors"
    elif kind == "nested too deep":
        deepest = _hf(folder, step)
        for _ in range(MAX_DEPTH + 1 + size % 200):  # rmtree recurses once per level: < 1000
            deepest = deepest / "d"
            deepest.mkdir()
        (deepest / "x.bin").write_bytes(b"deep")
        scene.done.add(step)
        scene.run_error.append(f"more than {MAX_DEPTH} levels below {folder}")
    elif kind == "changing while read":
        _hf(folder, step)
        scene.changing.append(folder / "model.safetensors")
        scene.finished.add(step)  # whole or not when the writer stops: either, visibly
    else:
        raise AssertionError(kind)


KINDS = (
    "lying sizes",
    "overlapping offsets",
    "truncated",
    "huge declared header",
    "header over the cap",
    "header up to the cap",
    "shard index over the cap",
    "marker over the cap",
    "header nested past the recursion limit",
    "weight behind a chain of links",
    "pickle holding code",
    "lying torch storage",
    "weight linked to a FIFO outside",
    "weight linked to a secret outside",
    "folder linked outside",
    "config linked to a FIFO outside",
    "marker linked to a FIFO outside",
    "FIFO as the weight file",
    "empty weight file",
    "nested too deep",
    "changing while read",
)

_JUNK = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), max_size=24
)
_NAMES = st.one_of(
    _JUNK.map(lambda j: f"checkpoint-{{}}{j}"),  # a checkpoint name and whatever follows
    _JUNK.map(lambda j: f"{j}\ncheckpoint-{{}}"),  # a newline posing as a log line
    st.sampled_from(
        [
            "checkpoint-\u0663{}",
            '=HYPERLINK("http://x","step_{}")',
            "a..b-checkpoint-{}",
            "ckpt@{}",
            "checkpoint-{}\x1b[31m",
        ]
    ),
    st.integers(1, 230).map(lambda n: "x" * n + "-checkpoint-{}"),
)


@dataclass(frozen=True)
class Plan:
    entries: tuple[tuple[str, int], ...]
    names: tuple[str, ...]


PLANS = st.builds(
    Plan,
    entries=st.lists(
        st.tuples(st.sampled_from(KINDS), st.integers(0, 2**20)), min_size=8, max_size=16
    ).map(tuple),
    names=st.lists(_NAMES, max_size=5).map(tuple),
)


def _name(template: str, step: int) -> str:
    name = template.replace("{}", str(step))
    while len(os.fsencode(name)) > 255:  # the file system's limit on one name
        name = name[1:]
    return name


def _build(base: Path, plan: Plan) -> Scene:
    scene = Scene(run=base / "root" / "hostile", outside=Outside(base / "outside"))
    scene.run.mkdir(parents=True)
    for i, (kind, size) in enumerate(plan.entries):
        _build_entry(scene, kind, 100 + i, size)
    for i, template in enumerate(plan.names):
        step = 500 + i
        name = _name(template, step)
        if not name or _ignored(name) or (scene.run / name).exists():
            continue  # hidden and temporary names are not looked at, by design
        _hf(scene.run / name, step)
        if not name.isprintable():
            scene.run_error.append(printable(name))
    return scene


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile-trees-db") / "template.db"
    upgrade(f"sqlite:///{path}")
    make_engine(f"sqlite:///{path}").dispose()
    return path


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
    return int(line.split()[1]) / 1024


@dataclass
class _State:
    statuses: dict[tuple[str, int], tuple[str, str]]  # (run, step) -> (status, error text)
    run_errors: dict[str, str]


def _state(url: str) -> _State:
    found = rows(
        url,
        "SELECT r.name, c.step, c.status, c.error, c.discovery_error "
        "FROM checkpoint c JOIN run r ON r.id = c.run_id",
    )
    return _State(
        {
            (name, step): (status, f"{error or ''}\n{discovery or ''}")
            for name, step, status, error, discovery in found
        },
        {name: error or "" for name, error in rows(url, "SELECT name, discovery_error FROM run")},
    )


def _settled(state: _State, scene: Scene) -> bool:
    statuses = state.statuses
    if any(s in ("pending", "running") for s, _ in statuses.values()):
        return False
    good = sum(1 for (run, _), (s, _) in statuses.items() if run == "good" and s == "done")
    hostile_run = state.run_errors.get("hostile", "")
    return (
        good == len(GOOD_STEPS)
        and all(("hostile", s) in statuses for s in [*scene.failed, *scene.done, *scene.finished])
        and all(words in hostile_run for words in scene.run_error)
    )


@contextlib.contextmanager
def _appending(files: list[Path], seconds: float) -> Iterator[threading.Thread]:
    """A writer appending a byte to each file every 0.1 s for ``seconds``."""
    stop = threading.Event()

    def write() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop.wait(0.1):
            for file in files:
                with file.open("ab") as handle:
                    handle.write(b"\0")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        yield writer
    finally:
        stop.set()
        writer.join()


def _watch(base: Path, scene: Scene, url: str) -> tuple[_State, float, str]:
    """Run one real worker over the root until everything is recorded; its state and peak."""
    root = scene.run.parent
    with session_scope(make_engine(url)) as session:
        for run in (root / "good", scene.run):
            registry.ensure_run(session, name=run.name, path=str(run))
    make_engine(url).dispose()
    env = {
        **os.environ,
        "ALPHAWATCH_ALLOWED_ROOTS": json.dumps([str(root)]),
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_MAX_ATTEMPTS": "1",
        "ALPHAWATCH_CHECK_TRAPS": "false",
        "ALPHAWATCH_ANALYSIS_WORKERS": "1",
        "ALPHAWATCH_JOB_TIMEOUT_S": "60",
        "ALPHAWATCH_LEASE_S": "30",
        "ALPHAWATCH_HEARTBEAT_S": "1",
    }
    log = base / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alphawatch", "watch", "--db", url, "--poll", "0.2"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        with _appending(scene.changing, 1.5):
            time.sleep(1.5)
        deadline = time.monotonic() + 90
        while not _settled(_state(url), scene):
            text = log.read_text(errors="replace")
            assert proc.poll() is None, f"the worker died:\n{text}"
            assert time.monotonic() < deadline, f"not everything was recorded:\n{text}"
            time.sleep(0.3)
        time.sleep(0.5)  # a few more passes over every hostile entry
        assert proc.poll() is None, f"the worker died:\n{log.read_text(errors='replace')}"
        peak = _peak_rss_mib(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text
    return _state(url), peak, text


# No shrinking: a failing example is reported as generated (its plan is in the message), in
# seconds; shrinking a worker run takes minutes.
@pytest.mark.slow
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(plan=PLANS)
def test_generated_hostile_trees_leave_the_worker_alive_and_confined(
    plan: Plan, tmp_path_factory: pytest.TempPathFactory, template_db: Path
) -> None:
    base = tmp_path_factory.mktemp("tree")
    scene = _build(base, plan)
    for step in GOOD_STEPS:
        _hf(scene.run.parent / "good" / f"checkpoint-{step}", step, seed=step)
    db = base / "aw.db"
    shutil.copy(template_db, db)
    url = f"sqlite:///{db}"
    reads = _Inotify(scene.outside.folders())
    try:
        state, peak, log = _watch(base, scene, url)
        read_outside = reads.reads()
    finally:
        reads.close()

    assert read_outside == [], f"read outside the root: {read_outside}"
    assert not scene.outside.pwned.exists(), "code from a pickle ran"
    assert rows(url, "SELECT count(*) FROM layer_metric WHERE name LIKE 'secret%'") == [(0,)]
    assert {
        s for (run, s), (status, _) in state.statuses.items() if run == "good" and status == "done"
    } == set(GOOD_STEPS)
    for step, words in scene.failed.items():
        status, error = state.statuses[("hostile", step)]
        assert status == "failed" and words in error, (step, status, error, plan)
    for step in scene.done:
        assert state.statuses[("hostile", step)][0] == "done", (step, state.statuses, plan)
    for step in scene.finished:
        assert state.statuses[("hostile", step)][0] in ("done", "failed"), (step, plan)
    for words in scene.run_error:
        assert words in state.run_errors["hostile"], (words, plan)
    assert not [line for line in log.splitlines() if line.startswith("checkpoint-")], log
    assert peak < PEAK_RSS_BOUND_MB, f"worker peak RSS {peak:.0f} MiB"
    shutil.rmtree(base)
