"""Folders nested deeper than any walk should go: bounded, iterative, never fatal.

1,100 nested folders inside a run's first checkpoint once made every later checkpoint of the
run fail (``RecursionError`` from the recursive walk behind the first checkpoint's
fingerprint), and the checkpoint itself was refused by discovery (``Path.rglob`` recursed too).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alphawatch.service.db.session import make_engine
from alphawatch.settings import Settings
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import Confinement, discover, fingerprint
from alphawatch.workers.checkpoints.tree import MAX_DEPTH, walk
from alphawatch.workers.spectral import Thresholds
from alphawatch.workers.watcher import Watcher
from tests.db import rows

LEVELS = 1_100  # past Python's recursion limit (1,000), within the OS's path limit


def _nest(folder: Path, levels: int) -> Path:
    deepest = folder
    for _ in range(levels):  # one by one: os.makedirs itself recurses once per level
        deepest = deepest / "d"
        deepest.mkdir()
    (deepest / "note.txt").write_text("deep")
    return deepest


def _unnest(top: Path) -> None:
    """Remove what :func:`_nest` made, from the bottom up (``shutil.rmtree``, and so pytest's
    clean-up of old temporary folders, recurse once per level)."""
    deepest = top
    while (deepest / "d").is_dir():
        deepest = deepest / "d"
    for file in deepest.iterdir():
        file.unlink()
    while deepest != top:
        deepest.rmdir()
        deepest = deepest.parent


@pytest.fixture
def run(tiny_run: Path, tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _nest(run / "checkpoint-10", LEVELS)
    yield run
    _unnest(run / "checkpoint-10")


def test_the_walk_stops_at_its_bound_and_names_what_it_passed_over(tmp_path: Path) -> None:
    top = tmp_path / "checkpoint-1"
    top.mkdir()
    _nest(top, MAX_DEPTH)  # its file lies in a folder MAX_DEPTH levels down: found
    (top / "too").mkdir()
    _nest(top / "too", MAX_DEPTH)  # one level more: its last folder is not entered
    tree = walk(str(top))
    found = {"/".join(parts[1:]) for parts, _ in tree.files}
    assert found == {"/".join(["d"] * MAX_DEPTH + ["note.txt"])}
    assert not tree.whole
    (problem,) = tree.problems
    assert str(top / "too" / "/".join(["d"] * MAX_DEPTH)) in problem
    assert f"more than {MAX_DEPTH} levels" in problem


def test_a_deep_folder_in_the_first_checkpoint_fails_no_later_checkpoint(run: Path) -> None:
    options = AnalysisOptions(
        method="ww",
        thresholds=Thresholds(),
        device=torch.device("cpu"),
        confine=Confinement.to([run]),
        workers=1,
        check_traps=False,
    )
    layers = analyze_checkpoint(run / "checkpoint-20", run / "checkpoint-10", options).layers
    assert len(layers) == 16
    # The first checkpoint's matrices were still read: the deep folder beside them is ignored.
    assert all(row.distance_from_init is not None for row in layers if row.kind != "embed")
    assert fingerprint(run / "checkpoint-10") != fingerprint(run / "checkpoint-20")


def test_discovery_keeps_the_checkpoint_and_names_the_deep_folder(run: Path) -> None:
    refs = {r.step: r for r in discover(run, settle_s=0.0, confine=Confinement.to([run]))}
    assert [s for s, r in refs.items() if r.complete and r.error is None] == [10, 20, 30]
    (note,) = refs[10].notes
    assert f"more than {MAX_DEPTH} levels below {run / 'checkpoint-10'}" in note


def test_the_worker_analyses_the_run_and_shows_the_deep_folder(run: Path, sqlite_url: str) -> None:
    watcher = Watcher(
        Settings(
            database_url=sqlite_url,
            device="cpu",
            settle_s=0.0,
            max_attempts=1,
            check_traps=False,
            analysis_workers=1,
        ),
        [run],
    )
    try:
        assert watcher.run_once() == 3
        # A second pass takes the settled checkpoints from memory: the run still says why.
        watcher.run_once()
    finally:
        watcher.close()
        make_engine(sqlite_url).dispose()
    assert rows(sqlite_url, "SELECT step, status FROM checkpoint ORDER BY step") == [
        (10, "done"),
        (20, "done"),
        (30, "done"),
    ]
    ((error,),) = rows(sqlite_url, "SELECT discovery_error FROM run")
    assert f"more than {MAX_DEPTH} levels below" in error
