"""Fault injection: hostile inputs beside a good run, one real worker process, both databases.

Each hostile input class is built as real files by a function decorated with ``@hostile``; it
says what the worker must record (:class:`Expect`: a failed checkpoint at a step, or a
discovery error on the run). One real ``alphawatch watch`` process then watches every run
under one allowed root, and the test asserts that the good run is fully analysed, the worker
is still alive, nothing outside the root was read (no layer of the "secret" model outside it
exists), every hostile input is recorded with a message naming the path and the rule, and the
worker's peak RSS stays bounded.

To add a case: write a ``@hostile`` function that builds its files under ``scene.root`` (new
runs with :meth:`Scene.run`) and calls ``scene.expect(...)``; use ``scene.after_registration``
for changes made after the worker first registered a run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from alphawatch.service.api import create_app
from alphawatch.service.db import registry
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows

ROOT = Path(__file__).resolve().parents[2]
# A worker that has imported torch, analysed a tiny run and refused every hostile input: its
# peak RSS measured about 340 MiB on the 2-core CI machine; three times that means something
# was read whole that should not have been.
PEAK_RSS_BOUND_MB = 1024


@dataclass(frozen=True)
class Expect:
    """What the worker must record for one hostile input."""

    run: str
    step: int | None  # the failed checkpoint's step; None: a discovery error on the run
    says: tuple[str, ...]  # fragments the recorded error must contain


@dataclass
class Scene:
    """The folders of one fault-injection run and what each hostile input must produce."""

    root: Path  # the only allowed root
    outside: Path  # beside the root, never to be read
    good: Path  # a real checkpoint of the tiny run, to copy
    secret: Path  # a real checkpoint outside the root; its layers are named "secret.*"
    expects: list[Expect] = field(default_factory=list)
    pre_registered: list[Path] = field(default_factory=list)
    after_registration: list[Callable[[], None]] = field(default_factory=list)
    must_not_exist: list[Path] = field(default_factory=list)  # what running code would make

    def run(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return path

    def checkpoint(self, run: str, name: str | bytes) -> Path:
        """A copy of the good checkpoint at ``run/name`` (``name`` may be raw bytes)."""
        target = os.fsencode(self.run(run)) + b"/" + os.fsencode(name)
        shutil.copytree(os.fsencode(self.good), target)
        return Path(os.fsdecode(target))

    def expect(self, run: str, step: int | None, *says: str) -> None:
        self.expects.append(Expect(run, step, says))


CASES: list[Callable[[Scene], None]] = []


def hostile(build: Callable[[Scene], None]) -> Callable[[Scene], None]:
    CASES.append(build)
    return build


def _trainer_state(folder: Path, content: bytes | str) -> None:
    data = content.encode() if isinstance(content, str) else content
    (folder / "trainer_state.json").write_bytes(data)


@hostile
def symlinked_checkpoint_folder(scene: Scene) -> None:
    (scene.run("hostile") / "checkpoint-101").symlink_to(scene.secret, target_is_directory=True)
    scene.expect("hostile", 101, "checkpoint-101", "outside the allowed roots")


@hostile
def symlinked_weight_file(scene: Scene) -> None:
    folder = scene.checkpoint("hostile", "checkpoint-102")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(scene.secret / "model.safetensors")
    scene.expect("hostile", 102, "model.safetensors", "outside the allowed roots")


@hostile
def symlinked_weight_file_checkpoint(scene: Scene) -> None:
    (scene.run("hostile") / "step-117.safetensors").symlink_to(scene.secret / "model.safetensors")
    scene.expect("hostile", 117, "step-117.safetensors", "outside the allowed roots")


@hostile
def symlinked_config_read_only_by_the_analysis(scene: Scene) -> None:
    folder = scene.checkpoint("hostile", "checkpoint-118")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(scene.secret / "config.json")
    scene.expect("hostile", 118, "config.json", "outside the allowed roots")


@hostile
def fifo_posing_as_a_weight_file(scene: Scene) -> None:
    # Opening a FIFO for reading waits for a writer: a blocking open would stop the worker.
    folder = scene.checkpoint("hostile", "checkpoint-119")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    # Discovery waits for it, then takes the settled folder as broken; the reader does not
    # count a FIFO as a weight file.
    scene.expect("hostile", 119, "checkpoint-119", "no weight files")


@hostile
def fifo_posing_as_a_config(scene: Scene) -> None:
    folder = scene.checkpoint("hostile", "checkpoint-120")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    scene.expect("hostile", 120, "config.json", "not a regular file")


def _index_to(scene: Scene, name: str, entry: str) -> None:
    folder = scene.run("hostile") / name
    folder.mkdir()
    shutil.copy(scene.good / "config.json", folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"secret.layers.0.self_attn.q_proj.weight": entry}})
    )
    _trainer_state(folder, '{"global_step": 0}')


@hostile
def shard_index_with_dotdot(scene: Scene) -> None:
    _index_to(scene, "checkpoint-103", "../../../outside/secret/model.safetensors")
    scene.expect("hostile", 103, "shard-index entry", "../../../outside", "'..'")


@hostile
def shard_index_with_absolute_path(scene: Scene) -> None:
    _index_to(scene, "checkpoint-104", str(scene.secret / "model.safetensors"))
    scene.expect("hostile", 104, "shard-index entry", str(scene.secret), "absolute paths")


@hostile
def peft_base_model_outside(scene: Scene) -> None:
    folder = scene.run("hostile") / "checkpoint-105"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "base_model_name_or_path": str(scene.secret),
            }
        )
    )
    module = "base_model.model.secret.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{module}.lora_A.weight": torch.randn(2, 16),
            f"{module}.lora_B.weight": torch.randn(32, 2),
        },
        str(folder / "adapter_model.safetensors"),
    )
    _trainer_state(folder, '{"global_step": 105}')
    scene.expect(
        "hostile", 105, "base_model_name_or_path", str(scene.secret), "outside the allowed roots"
    )


@hostile
def garbage_trainer_state(scene: Scene) -> None:
    _trainer_state(scene.checkpoint("hostile", "checkpoint-106"), b"\xff\x00{not json")
    scene.expect("hostile", 106, "trainer_state.json", "does not parse")


@hostile
def trainer_state_nested_past_the_recursion_limit(scene: Scene) -> None:
    _trainer_state(scene.checkpoint("hostile", "checkpoint-107"), "[" * 200_000)
    scene.expect("hostile", 107, "trainer_state.json", "does not parse", "Recursion")


@hostile
def trainer_state_step_infinite(scene: Scene) -> None:
    _trainer_state(scene.checkpoint("hostile", "checkpoint-108"), '{"global_step": 1e400}')
    scene.expect("hostile", 108, "trainer_state.json", "inf", "not a step number")


@hostile
def trainer_state_not_an_object(scene: Scene) -> None:
    _trainer_state(scene.checkpoint("hostile", "checkpoint-109"), "[1, 2, 3]")
    scene.expect("hostile", 109, "trainer_state.json", "not a JSON object")


@hostile
def step_beyond_64_bits(scene: Scene) -> None:
    scene.checkpoint("hostile", f"checkpoint-{2**64}")
    scene.expect("hostile", None, f"checkpoint-{2**64}", "not a step number")


@hostile
def negative_step(scene: Scene) -> None:
    folder = scene.run("negative")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(scene.good / name, folder)
    _trainer_state(folder, '{"global_step": -5}')
    scene.expect("negative", None, "-5", "not a step number")


@hostile
def newline_in_folder_name(scene: Scene) -> None:
    # Posing as checkpoint-110: a regex ending in "$" would also match before the newline.
    scene.checkpoint("hostile", "checkpoint-110\n")
    scene.expect("hostile", None, "checkpoint-110\\n", "not printable")


@hostile
def folder_name_not_utf8(scene: Scene) -> None:
    try:
        scene.checkpoint("hostile", b"checkpoint-111\xff")
    except OSError:  # a filesystem that insists on UTF-8 names cannot hold this case
        return
    scene.expect("hostile", None, "checkpoint-111\\xff", "not printable")


@hostile
def dcp_metadata_pickle_with_code(scene: Scene) -> None:
    folder = scene.run("hostile") / "step_116"
    folder.mkdir()
    marker = scene.outside / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    scene.expect("hostile", 116, ".metadata", "needs code")
    scene.must_not_exist.append(marker)


@hostile
def run_folder_swapped_for_a_symlink(scene: Scene) -> None:
    scene.checkpoint("swapped", "checkpoint-10")
    scene.pre_registered.append(scene.root / "swapped")
    target = scene.outside / "swapped"
    shutil.copytree(scene.secret.parent, target)

    def swap() -> None:
        (scene.root / "swapped").rename(scene.outside / "swapped-original")
        (scene.root / "swapped").symlink_to(target, target_is_directory=True)

    scene.after_registration.append(swap)
    scene.expect("swapped", None, "run folder", "outside the allowed roots")
    scene.expect("swapped", 10, "checkpoint", "outside the allowed roots")


@hostile
def weight_file_swapped_for_a_symlink_after_registration(scene: Scene) -> None:
    folder = scene.checkpoint("late", "checkpoint-10")
    scene.pre_registered.append(scene.root / "late")

    def swap() -> None:
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to(scene.secret / "model.safetensors")

    scene.after_registration.append(swap)
    scene.expect("late", 10, "model.safetensors", "outside the allowed roots")


def _secret_checkpoint(folder: Path) -> None:
    """A real, readable checkpoint whose every layer is named ``secret.*``."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(7)
    save_file(
        {
            f"secret.layers.{i}.self_attn.q_proj.weight": torch.randn(32, 16, generator=g)
            for i in range(2)
        },
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text('{"model_type": "llama"}')
    _trainer_state(folder, '{"global_step": 1}')


def _build(tmp_path: Path, tiny_run: Path) -> Scene:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    _secret_checkpoint(outside / "secret" / "checkpoint-1")
    scene = Scene(
        root=root,
        outside=outside,
        good=tiny_run / "checkpoint-10",
        secret=outside / "secret" / "checkpoint-1",
    )
    shutil.copytree(tiny_run, root / "good")
    for build in CASES:
        build(scene)
    return scene


def _settled(url: str, scene: Scene) -> bool:
    states = _rows(
        url, "SELECT r.name, c.step, c.status FROM checkpoint c JOIN run r ON r.id = c.run_id"
    )
    if any(status in ("pending", "running") for _, _, status in states):
        return False
    recorded = {(name, step) for name, step, _ in states}
    run_errors = {
        name for name, error in _rows(url, "SELECT name, discovery_error FROM run") if error
    }
    done = sum(1 for name, _, status in states if name == "good" and status == "done")
    return done == 3 and all(
        (e.run, e.step) in recorded if e.step is not None else e.run in run_errors
        for e in scene.expects
    )


def _peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM), its own since it started the program.

    Not ``ru_maxrss`` from ``wait4``: exec records the parent's resident size at the fork as
    the child's high-water mark, so a child of a large test process would report the parent.
    """
    status = Path(f"/proc/{pid}/status").read_text()
    (line,) = [x for x in status.splitlines() if x.startswith("VmHWM:")]
    return int(line.split()[1]) / 1024


def test_hostile_inputs_fail_alone_and_the_worker_goes_on(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    scene = _build(tmp_path, tiny_run)
    settings = Settings(
        database_url=db_url, allowed_roots=[scene.root], device="cpu", settle_s=0.0, max_attempts=1
    )
    for run in scene.pre_registered:
        # Registered and discovered while still whole, as the API and an earlier pass would.
        Watcher(settings, [run]).discover_once()
    for change in scene.after_registration:
        change()
    with session_scope(make_engine(db_url)) as session:
        for run in sorted(scene.root.iterdir()):
            registry.ensure_run(session, name=run.name, path=str(run))

    env = {
        **os.environ,
        "ALPHAWATCH_ALLOWED_ROOTS": json.dumps([str(scene.root)]),
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_MAX_ATTEMPTS": "1",
        "ALPHAWATCH_LEASE_S": "30",
        "ALPHAWATCH_HEARTBEAT_S": "1",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alphawatch", "watch", "--db", db_url, "--poll", "0.2"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 240
        while not _settled(db_url, scene):
            assert proc.poll() is None, f"the worker died:\n{log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, (
                f"not every input was recorded in time:\n{log.read_text(errors='replace')}"
            )
            time.sleep(0.3)
        time.sleep(1.0)  # a few more passes over every hostile input
        assert proc.poll() is None, f"the worker died:\n{log.read_text(errors='replace')}"
        peak_mib = _peak_rss_mib(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text(errors="replace")

    states = {
        (name, step): (status, error, discovery_error)
        for name, step, status, error, discovery_error in _rows(
            db_url,
            "SELECT r.name, c.step, c.status, c.error, "
            "c.discovery_error FROM checkpoint c "
            "JOIN run r ON r.id = c.run_id",
        )
    }
    assert {k: v[0] for k, v in states.items() if k[0] == "good"} == {
        ("good", 10): "done",
        ("good", 20): "done",
        ("good", 30): "done",
    }
    good_layers = _rows(
        db_url,
        "SELECT count(*) FROM layer_metric lm JOIN checkpoint c ON "
        "c.id = lm.checkpoint_id JOIN run r ON r.id = c.run_id "
        "WHERE r.name = 'good'",
    )[0][0]
    assert good_layers == 3 * 16  # 2 blocks x 7 matrices + embeddings + head, every step

    run_errors = dict(_rows(db_url, "SELECT name, discovery_error FROM run"))
    for expect in scene.expects:
        if expect.step is None:
            message = run_errors[expect.run] or ""
        else:
            status, error, _ = states[(expect.run, expect.step)]
            assert status == "failed", (expect, status)
            message = error or ""
        for fragment in expect.says:
            assert fragment in message, (expect, message)

    # Nothing outside the root was read: no layer of the secret model, no layer of any hostile
    # checkpoint, and the pickle's command never ran.
    assert _rows(db_url, "SELECT count(*) FROM layer_metric WHERE name LIKE 'secret%'") == [(0,)]
    assert _rows(
        db_url,
        "SELECT count(*) FROM layer_metric lm JOIN checkpoint c ON "
        "c.id = lm.checkpoint_id JOIN run r ON r.id = c.run_id "
        "WHERE r.name <> 'good'",
    ) == [(0,)]
    for path in scene.must_not_exist:
        assert not path.exists(), f"{path} was created: code from a pickle ran"
    assert peak_mib < PEAK_RSS_BOUND_MB, f"peak RSS {peak_mib:.0f} MiB"

    # The API and so the dashboard show what discovery refused, run by run.
    with TestClient(create_app(settings)) as client:
        runs = {r["name"]: r for r in client.get("/api/v1/runs").json()["runs"]}
        assert "not a step number" in runs["hostile"]["discovery_error"]
        assert runs["good"]["discovery_error"] is None
        listed = client.get(f"/api/v1/runs/{runs['hostile']['id']}/checkpoints").json()
        refused = {c["step"]: c for c in listed["checkpoints"]}
        assert "outside the allowed roots" in refused[101]["discovery_error"]
        assert refused[101]["status"] == "failed"
    print(f"worker peak RSS {peak_mib:.0f} MiB over {len(scene.expects)} hostile inputs")


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_every_case_expects_something(
    build: Callable[[Scene], None], tmp_path: Path, tiny_run: Path
) -> None:
    # A case that expects nothing would pass whatever the worker does.
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    _secret_checkpoint(outside / "secret" / "checkpoint-1")
    scene = Scene(
        root=root,
        outside=outside,
        good=tiny_run / "checkpoint-10",
        secret=outside / "secret" / "checkpoint-1",
    )
    build(scene)
    assert scene.expects or build is folder_name_not_utf8
