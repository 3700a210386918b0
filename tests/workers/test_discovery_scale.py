"""Discovery that costs little when nothing changed, and still sees every change it must.

A pass skips a run whose folders kept their stamps and whose checkpoints were all settled, and
reads again only new or unsettled entries of a run that changed; files rewritten in place are
found by the round-robin re-check of settled checkpoints (``rewrite_checks_per_poll``). These
tests prove each half: what is skipped is really not read (a settled checkpoint made unreadable
in place stays as it was), and every change is still seen within the bound the docs state.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from alphawatch.settings import Settings
from alphawatch.workers.checkpoints import Confinement, fingerprint, survey, unchanged
from alphawatch.workers.checkpoints.fingerprints import (
    Shape,
    checkpoint_files,
    escapes,
    fingerprint_shape,
    restat,
)
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows


def _settings(url: str, root: Path, **extra: object) -> Settings:
    return Settings(
        database_url=url,
        allowed_roots=[root],
        device="cpu",
        settle_s=0.0,
        lease_s=30.0,
        heartbeat_s=0.5,
        **extra,
    )  # type: ignore[arg-type]


def _age(path: Path, seconds: float = 10.0) -> None:
    """Back-date a folder's mtime: a folder changed within the last 2 s is always listed."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _pathlib_fingerprint(path: Path, confine: Confinement) -> str:
    """The fingerprint as it was computed before it used os.scandir (stored values use it)."""
    digest = hashlib.sha1(usedforsecurity=False)
    for file in checkpoint_files(path):
        name = os.fsencode(file.relative_to(path.parent))
        if escapes(file, confine):
            digest.update(name + b":outside\n")
            continue
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue
        digest.update(name + f":{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def test_fingerprint_is_the_one_stored_before(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    folder = root / "checkpoint-5"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a-b").mkdir()  # "a-b" sorts before "a/..." as text, after it as parts
    (outside / "dir").mkdir(parents=True)
    for name in ("model.safetensors", "a/b/x.bin", "a-b/y.bin", "a/z", ".hidden", "a/b/.h"):
        (folder / name).write_bytes(name.encode())
    (outside / "secret.bin").write_bytes(b"secret")
    (outside / "dir" / "inner.bin").write_bytes(b"inner")
    (folder / "in-link").symlink_to(folder / "a" / "z")
    (folder / "out-link").symlink_to(outside / "secret.bin")
    (folder / "dir-link").symlink_to(outside / "dir", target_is_directory=True)  # not entered
    (folder / "dangling").symlink_to(tmp_path / "nothing")
    confine = Confinement.to([root])
    for path in (folder, folder / "model.safetensors", folder / "out-link", folder / "a"):
        assert fingerprint(path, confine) == _pathlib_fingerprint(path, confine), path
    before = fingerprint(folder, confine)
    (folder / "a" / "b" / "x.bin").write_bytes(b"rewritten")
    assert fingerprint(folder, confine) != before


def _checkpoint(tiny_run: Path, run: Path, step: int) -> Path:
    folder = run / f"checkpoint-{step}"
    shutil.copytree(tiny_run / f"checkpoint-{min(step, 30)}", folder)
    return folder


def test_a_pass_skips_what_settled_and_sees_what_changed(
    tiny_run: Path, tmp_path: Path, sqlite_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    for step in (10, 20, 30):
        _checkpoint(tiny_run, run, step)
    _age(run)
    # No round-robin re-check: what a pass skips is then never read again.
    watcher = Watcher(_settings(sqlite_url, root, rewrite_checks_per_poll=0), [run])
    assert watcher.discover_once() == 3
    listed = survey(run, settle_s=0.0).listed
    assert unchanged(listed)

    # Made unreadable in place: its folder and the run folder keep their stamps. A pass that
    # read it again would refuse it; the settled checkpoint is not read.
    state = run / "checkpoint-20" / "trainer_state.json"
    with state.open("r+b") as handle:
        handle.write(b"\xff\xfe not json")
    assert unchanged(listed)
    assert watcher.discover_once() == 0
    assert _rows(
        sqlite_url,
        "SELECT count(*) FROM checkpoint WHERE discovery_error IS NOT NULL OR status = 'failed'",
    ) == [(0,)]

    # A new checkpoint changes the run folder: it is found at the next pass.
    _checkpoint(tiny_run, run, 40)
    assert not unchanged(listed)
    assert watcher.discover_once() == 1
    # A scan asked for reads the run whole: now the broken file is seen (and refused).
    watcher.discover_once(runs=[run], full=[run])
    ((error,),) = _rows(sqlite_url, "SELECT discovery_error FROM checkpoint WHERE step = 20")
    assert "trainer_state.json" in error


def test_an_incomplete_checkpoint_is_looked_at_until_it_completes(
    tiny_run: Path, tmp_path: Path, sqlite_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    _checkpoint(tiny_run, run, 10)
    late = _checkpoint(tiny_run, run, 20)
    state = (late / "trainer_state.json").read_bytes()
    (late / "trainer_state.json").unlink()  # the trainer writes it last
    _age(run)
    watcher = Watcher(_settings(sqlite_url, root, rewrite_checks_per_poll=0), [run])
    watcher.settings.settle_s = 3600.0  # without its marker it never settles in this test
    assert watcher.discover_once() == 1
    _age(late)
    assert watcher.discover_once() == 0
    # Written inside the checkpoint folder: the run folder does not change, the unsettled
    # checkpoint is read again all the same.
    (late / "trainer_state.json").write_bytes(state)
    _age(run)
    assert watcher.discover_once() == 1


def test_nested_folders_rotation_and_a_folder_made_again(
    tiny_run: Path, tmp_path: Path, sqlite_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "lightning"
    nested = run / "lightning_logs" / "version_0" / "checkpoints"
    nested.mkdir(parents=True)
    weights = tiny_run / "checkpoint-10" / "model.safetensors"
    shutil.copy(weights, nested / "step=10.safetensors")
    for folder in (nested, nested.parent, nested.parent.parent, run):
        _age(folder)
    watcher = Watcher(_settings(sqlite_url, root, rewrite_checks_per_poll=0), [run])
    assert watcher.discover_once() == 1
    assert watcher.discover_once() == 0
    # Three levels down: only the deepest folder changes, and it is stamped too.
    shutil.copy(weights, nested / "step=20.safetensors")
    assert watcher.discover_once() == 1

    # Rotation: deleted, then saved again under the same name with other weights.
    hf = root / "hf"
    _checkpoint(tiny_run, hf, 10)
    watcher.run_dirs.append(hf)
    assert watcher.discover_once() == 1
    shutil.rmtree(hf / "checkpoint-10")
    assert watcher.discover_once() == 0
    shutil.copytree(tiny_run / "checkpoint-30", hf / "checkpoint-10")
    assert watcher.discover_once() == 0  # step 10 is queued still: its fingerprint follows
    (fp,) = _rows(
        sqlite_url,
        "SELECT fingerprint FROM checkpoint c JOIN run r ON r.id = c.run_id WHERE r.name = 'hf'",
    )[0]
    assert fp == fingerprint(hf / "checkpoint-10", Confinement.to([root]))


@pytest.mark.parametrize("per_poll", [1, 2])
def test_a_rewrite_in_place_is_seen_within_the_round_robin_bound(
    tiny_run: Path, tmp_path: Path, sqlite_url: str, per_poll: int
) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    for step in (10, 20, 30):
        _checkpoint(tiny_run, run, step)
    _age(run)
    watcher = Watcher(_settings(sqlite_url, root, rewrite_checks_per_poll=per_poll), [run])
    watcher.discover_once()
    while watcher.process_one():  # analysed: a rewrite now queues them again
        pass
    watcher.close()
    # Rewritten in place: the same file, new bytes, no folder changes.
    target = run / "checkpoint-20" / "model.safetensors"
    data = (tiny_run / "checkpoint-30" / "model.safetensors").read_bytes()
    with target.open("r+b") as handle:
        handle.write(data)
    bound = -(-3 // per_poll)  # ceil(settled checkpoints / checks per poll) passes
    passes = 0
    while _rows(sqlite_url, "SELECT status FROM checkpoint WHERE step = 20") != [("pending",)]:
        passes += 1
        assert passes <= bound, f"not seen within {bound} passes"
        watcher.discover_once()
    assert _rows(sqlite_url, "SELECT step FROM checkpoint WHERE status = 'pending'") == [(20,)]


def test_a_restarted_worker_reads_no_registered_checkpoint_whose_files_it_still_lists(
    tiny_run: Path, tmp_path: Path, db_url: str
) -> None:
    """A worker started afresh on the same database takes a checkpoint registered with the
    fingerprint its files still give (a ``stat`` of each) as settled, and reads none of its
    files; one whose files changed since, or that now leads outside the roots, is read (and
    here refused) as a new one is."""
    root = tmp_path / "runs"
    run = root / "run"
    for step in (10, 20, 30):
        _checkpoint(tiny_run, run, step)
    settings = _settings(db_url, root, rewrite_checks_per_poll=1)
    assert Watcher(settings, [run]).discover_once() == 3

    # While no worker runs: checkpoint-20's marker is made unreadable in place, its size and
    # times kept (a worker that read it would refuse it); checkpoint-30's is broken and a byte
    # longer; checkpoint-10 becomes a link to a copy outside the roots, which has the same
    # names, sizes and times, hence the same fingerprint.
    state = run / "checkpoint-20" / "trainer_state.json"
    kept = state.stat()
    with state.open("r+b") as handle:
        handle.write(b"\xff\xfe not json")
    os.utime(state, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    longer = run / "checkpoint-30" / "trainer_state.json"
    longer.write_bytes(b"\xff" + longer.read_bytes())
    outside = tmp_path / "outside" / "checkpoint-10"
    shutil.copytree(run / "checkpoint-10", outside)
    shutil.rmtree(run / "checkpoint-10")
    (run / "checkpoint-10").symlink_to(outside, target_is_directory=True)
    stored = dict(_rows(db_url, "SELECT step, fingerprint FROM checkpoint"))
    assert fingerprint(run / "checkpoint-10") == stored[10]
    assert fingerprint(run / "checkpoint-20") == stored[20]

    restarted = Watcher(settings, [run])
    assert restarted.discover_once() == 0
    errors = dict(_rows(db_url, "SELECT step, discovery_error FROM checkpoint"))
    assert errors[20] is None  # not read
    assert "trainer_state.json" in errors[30]
    assert "outside the allowed roots" in errors[10]
    # Settled in this process now: re-checked for rewrites by a stat of its members.
    assert [(path.name, shape is not None) for _, path, _, shape in restarted._memory.round] == [
        ("checkpoint-20", True)
    ]


def _shaped(folder: Path) -> Shape:
    confine = Confinement.to([])
    digest, shape = fingerprint_shape(folder, confine)
    assert digest == fingerprint(folder, confine)
    assert shape is not None
    return shape


def test_a_stat_of_the_known_members_sees_every_change_a_fingerprint_sees(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    (folder / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "sub/optim.pt"):
        (folder / name).write_bytes(b"x" * 64)
    shape = _shaped(folder)
    assert set(shape.members) == {"", "sub", "model.safetensors", "config.json", "sub/optim.pt"}
    assert restat(folder, shape) == shape.stamp  # nothing changed: no fingerprint needed

    printed = fingerprint(folder)

    def changed(change: str) -> None:
        nonlocal shape, printed
        assert restat(folder, shape) != shape.stamp, change
        assert fingerprint(folder) != printed, change  # a change the fingerprint sees too
        shape, printed = _shaped(folder), fingerprint(folder)

    then = time.time() - 100
    os.utime(folder / "sub" / "optim.pt", (then, then))  # rewritten: same size, other mtime
    changed("mtime")
    with (folder / "config.json").open("r+b") as handle:  # in place, longer
        handle.seek(0, os.SEEK_END)
        handle.write(b"y")
    changed("size")
    (folder / "sub" / "extra.bin").write_bytes(b"z")  # a file added in a nested folder
    changed("added")
    (folder / "sub" / "extra.bin").unlink()
    changed("deleted")
    (folder / "new.json").write_bytes(b"x" * 64)
    os.replace(folder / "new.json", folder / "config.json")  # replaced by rename
    changed("replaced")
    shutil.rmtree(folder)
    assert restat(folder, shape) is None


def test_a_checkpoint_holding_a_symlink_has_no_shape(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    (tmp_path / "weights.bin").write_bytes(b"w")
    (folder / "model.bin").symlink_to(tmp_path / "weights.bin")
    # The target changes without the link or its folder changing: only a fingerprint sees it.
    assert fingerprint_shape(folder, Confinement.to([tmp_path]))[1] is None
    assert fingerprint_shape(folder, Confinement.to([folder]))[1] is None


def test_a_rewrite_is_seen_through_the_stat_round_and_the_fingerprint_round(
    tiny_run: Path, tmp_path: Path, sqlite_url: str
) -> None:
    root = tmp_path / "runs"
    run = root / "run"
    for step in (10, 20):
        _checkpoint(tiny_run, run, step)
    # checkpoint-20 holds a symlinked file (allowed: inside the root), so it has no shape and
    # is fingerprinted; checkpoint-10 is re-checked by stat.
    shared = root / "shared.json"
    shared.write_text("{}")
    (run / "checkpoint-20" / "extra.json").symlink_to(shared)
    _age(run)
    watcher = Watcher(_settings(sqlite_url, root, rewrite_checks_per_poll=2), [run])
    watcher.discover_once()
    while watcher.process_one():
        pass
    watcher.close()
    shapes = {path.name: shape for _, path, _, shape in watcher._memory.round}
    assert shapes["checkpoint-20"] is None and shapes["checkpoint-10"] is not None
    then = time.time() - 100
    os.utime(run / "checkpoint-10" / "model.safetensors", (then, then))
    shared.write_text('{"a": 1}')  # the link's target: neither the link nor a folder changes
    watcher.discover_once()
    assert _rows(
        sqlite_url, "SELECT step FROM checkpoint WHERE status = 'pending' ORDER BY step"
    ) == [(10,), (20,)]
