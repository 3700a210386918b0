"""Update spectra and layer distances against the previous checkpoint of a run in a bucket: a
worker that keeps up reads each checkpoint from the bucket once. The checkpoint in hand (read
whole anyway) is downloaded into the worker's local copies and read from disk; the next
checkpoint's analysis finds its previous one there, with no request, in any format. Where the
copies cannot hold it, the previous checkpoint is read as without copies, with the same rows.

A real worker (``Watcher``, its analysis process, PostgreSQL) against a real S3 API on
127.0.0.1 (moto's server mode, every request counted by key).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from alphawatch.locations import object_url
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import UNCONFINED, CheckpointError
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows
from tests.factories import worker_settings
from tests.objectstore import CountingServer, client_fs, upload
from tests.workers.small import MATRICES
from tests.workers.test_base_copies import FORMATS, READ, _folder

Check = Callable[[CountingServer, int, int | None], None]
Rows = dict[tuple[int, str], tuple[object, ...]]
READS = {**READ, "safetensors": ["model.safetensors"]}  # what reading the weights opens


def _gets(s3: CountingServer, bucket: str, run: str, fmt: str, step: int) -> Counter[str]:
    """GETs of each object of checkpoint ``step`` of ``run`` since the last reset, by key."""
    prefix = f"/{bucket}/{run}/{_folder(fmt, step)}/"
    return Counter(
        key.removeprefix(prefix)
        for kind, key, _ in s3.log
        if kind == "GET" and key.startswith(prefix)
    )


def _analyse_new(watcher: Watcher, s3: CountingServer) -> int:
    """Register what is new, then analyse every queued checkpoint with requests counted from
    then on (discovery's own reads left out)."""
    watcher.discover_once()
    s3.reset()
    done = 0
    while watcher.process_one():
        done += 1
    return done


def _stored(pg_url: str, url: str) -> Rows:
    """Every row of the run at ``url``: its weights (with their distances from the checkpoint
    before) and their ``@delta_prev`` update spectra."""
    found = _rows(
        pg_url,
        'SELECT c.step, lm.name, lm.alpha, lm."D", lm.pl_xmin, lm.num_pl_spikes, lm.log_norm, '
        "lm.change_fro, lm.change_spectral, lm.subspace_overlap, lm.overlap_k, "
        "lm.change_ref_step FROM layer_metric lm JOIN checkpoint c ON c.id = lm.checkpoint_id "
        f"JOIN run r ON r.id = c.run_id WHERE r.path = '{url}'",
    )
    return {(int(step), name): tuple(values) for step, name, *values in found}


def _same(ours: Rows, theirs: Rows) -> None:
    assert ours.keys() == theirs.keys()
    for key, values in ours.items():
        for mine, other in zip(values, theirs[key], strict=True):
            if isinstance(mine, float) and isinstance(other, float):
                assert math.isclose(mine, other, rel_tol=1e-12), key
            else:
                assert mine == other, key


def _keep_up(
    s3: CountingServer,
    bucket: str,
    tmp_path: Path,
    watchers: dict[str, Watcher],
    fmt: str,
    check: dict[str, Check],
) -> None:
    """Three checkpoints written one after another to each watcher's run (by the run name it
    watches), each analysed before the next is written; ``check[run](s3, step, prev)`` after
    each analysis. One run after the other: the watchers share a queue."""
    for run, watcher in watchers.items():
        prev = None
        for step in (10, 20, 30):
            written = FORMATS[fmt][0](tmp_path / run / f"upload-{step}", step, seed=step)
            upload(client_fs(s3), written.parent, f"s3://{bucket}/{run}")
            assert _analyse_new(watcher, s3) == 1
            check[run](s3, step, prev)
            prev = step


@pytest.mark.parametrize("fmt", ["safetensors", "pickle", "dcp"])
def test_a_worker_that_keeps_up_reads_each_checkpoint_from_the_bucket_once(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str, fmt: str
) -> None:
    watchers = {
        "copied": Watcher(
            worker_settings(pg_url, deltas="prev", analysis_workers=1),
            [object_url(f"s3://{bucket}/copied")],
        ),
        "plain": Watcher(
            worker_settings(pg_url, deltas="prev", analysis_workers=1, base_cache_mb=0),
            [object_url(f"s3://{bucket}/plain")],
        ),
    }

    def copied(s3: CountingServer, step: int, prev: int | None) -> None:
        # The checkpoint in hand: each object its weights are read from, once, whole.
        gets = _gets(s3, bucket, "copied", fmt, step)
        assert {k: gets[k] for k in READS[fmt]} == dict.fromkeys(READS[fmt], 1), gets
        if prev is not None:  # its base: from the copy the analysis before made
            assert not _gets(s3, bucket, "copied", fmt, prev), s3.log

    def plain(s3: CountingServer, step: int, prev: int | None) -> None:
        if prev is not None:  # without copies, the base is read from the bucket again
            assert sum(_gets(s3, bucket, "plain", fmt, prev).values()) > 0

    try:
        _keep_up(s3, bucket, tmp_path, watchers, fmt, {"copied": copied, "plain": plain})
        ours = _stored(pg_url, f"s3://{bucket}/copied")
        assert sum(name.endswith("@delta_prev") for _, name in ours) == 2 * len(MATRICES)
        assert sum(values[5] is not None for values in ours.values()) == 2 * len(MATRICES)
        _same(ours, _stored(pg_url, f"s3://{bucket}/plain"))
        # The copies hold what reading the weights opens (never the trainer's optimizer.pt).
        held = watchers["copied"]._objects.base / "bases"
        assert len(list(held.iterdir())) == 3 * len(READS[fmt])
    finally:
        for watcher in watchers.values():
            watcher.close()


def test_copies_too_small_for_a_checkpoint_leave_it_to_ranged_reads_with_the_same_rows(
    s3: CountingServer,
    bucket: str,
    tmp_path: Path,
    pg_url: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # ~37 KiB of weights per checkpoint, 4 KiB allowed on disk.
    watchers = {
        "small": Watcher(
            worker_settings(pg_url, deltas="prev", analysis_workers=1, base_cache_mb=4 / 1024),
            [object_url(f"s3://{bucket}/small")],
        ),
        "plain": Watcher(
            worker_settings(pg_url, deltas="prev", analysis_workers=1, base_cache_mb=0),
            [object_url(f"s3://{bucket}/plain")],
        ),
    }

    def small(s3: CountingServer, step: int, prev: int | None) -> None:
        assert sum(_gets(s3, bucket, "small", "safetensors", step).values()) > 1  # by ranges
        if prev is not None:
            assert sum(_gets(s3, bucket, "small", "safetensors", prev).values()) > 1

    try:
        _keep_up(
            s3,
            bucket,
            tmp_path,
            watchers,
            "safetensors",
            {"small": small, "plain": lambda *_: None},
        )
        _same(_stored(pg_url, f"s3://{bucket}/small"), _stored(pg_url, f"s3://{bucket}/plain"))
        assert not any((watchers["small"]._objects.base / "bases").iterdir())
    finally:
        for watcher in watchers.values():
            watcher.close()
    said = capfd.readouterr().err
    assert said.count("(ALPHAWATCH_BASE_CACHE_MB): it is read by ranged GETs") == 1, said


def test_copies_for_two_checkpoints_read_the_base_from_disk_and_the_spent_one_goes_first(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    """Room for the copies of two checkpoints' weights: the previous one and the one in hand.
    The one before them (compared with already) is what makes room; the analysis reads from
    disk what it copied as the checkpoint in hand before."""
    written = FORMATS["safetensors"][0](tmp_path / "size", 1, seed=1) / "model.safetensors"
    room = 2 * written.stat().st_size + 1024  # trainer_state.json copies beside
    settings = worker_settings(
        pg_url, deltas="prev", analysis_workers=1, base_cache_mb=room / 1024**2
    )
    watcher = Watcher(settings, [object_url(f"s3://{bucket}/run")])

    def check(s3: CountingServer, step: int, prev: int | None) -> None:
        if prev is not None:
            assert not _gets(s3, bucket, "run", "safetensors", prev), s3.log

    try:
        _keep_up(s3, bucket, tmp_path, {"run": watcher}, "safetensors", {"run": check})
        held = sorted(p.stat().st_size for p in (watcher._objects.base / "bases").iterdir())
        assert sum(held) <= room
        assert held.count(written.stat().st_size) == 2  # checkpoints 20 and 30
    finally:
        watcher.close()


def test_copies_for_one_checkpoint_never_evict_the_base_the_analysis_reads(
    s3: CountingServer,
    bucket: str,
    tmp_path: Path,
    pg_url: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Room for one checkpoint's weights: the copy of the previous checkpoint is read, the
    checkpoint in hand is read by ranges rather than evict it; the next analysis copies its
    checkpoint and reads its base by ranges. Said once."""
    written = FORMATS["safetensors"][0](tmp_path / "size", 1, seed=1) / "model.safetensors"
    room = written.stat().st_size + 1024
    settings = worker_settings(
        pg_url, deltas="prev", analysis_workers=1, base_cache_mb=room / 1024**2
    )
    watcher = Watcher(settings, [object_url(f"s3://{bucket}/run")])
    seen: dict[int, tuple[int, int]] = {}

    def check(s3: CountingServer, step: int, prev: int | None) -> None:
        base = _gets(s3, bucket, "run", "safetensors", prev) if prev is not None else Counter()
        now = _gets(s3, bucket, "run", "safetensors", step)
        seen[step] = (now["model.safetensors"], base["model.safetensors"])

    try:
        _keep_up(s3, bucket, tmp_path, {"run": watcher}, "safetensors", {"run": check})
        # 10 copied; 20 by ranges, 10 from its copy; 30 copied, 20 by ranges.
        assert seen[10] == (1, 0) and seen[20][1] == 0 and seen[30][0] == 1, seen
        assert seen[20][0] > 1 and seen[30][1] > 1, seen
    finally:
        watcher.close()
    said = capfd.readouterr().err
    assert said.count("room for three checkpoints' weights") == 1, said


def test_a_copied_pickle_is_refused_past_the_spool_bound_as_a_spooled_one(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """ALPHAWATCH_SPOOL_MAX_MB bounds what an analysis downloads of a checkpoint's pickles
    whether they land in the spool or in the local copies: copies never change the answer."""
    FORMATS["pickle"][0](tmp_path / "run", 10, seed=1)
    FORMATS["pickle"][0](tmp_path / "run", 20, seed=2)
    upload(client_fs(s3), tmp_path / "run", f"s3://{bucket}/run")
    settings = worker_settings(
        "sqlite://", deltas="prev", analysis_workers=1, spool_max_mb=16 / 1024
    )
    spooled = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
    copied = AnalysisOptions.from_settings(
        settings, confine=UNCONFINED, base_copies=tmp_path / "copies"
    )
    checkpoint = object_url(f"s3://{bucket}/run/checkpoint-20")
    prev = object_url(f"s3://{bucket}/run/checkpoint-10")
    for options in (spooled, copied):
        with pytest.raises(CheckpointError, match="ALPHAWATCH_SPOOL_MAX_MB"):
            analyze_checkpoint(checkpoint, None, options, prev=prev)
    assert not any((tmp_path / "copies").iterdir())


def test_the_spent_previous_checkpoint_makes_room_before_another_runs_newest(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """Room for three copies: run a's previous checkpoint, compared with already, makes room
    before run b's newest, though b's was used less recently."""
    from alphawatch.workers.checkpoints.objects import LocalCopies, Mirrors

    mirrors = Mirrors()
    found = {}
    for run, step in (("a", 10), ("b", 10), ("a", 20)):
        FORMATS["safetensors"][0](tmp_path / run, step, seed=step)
    for run, step in (("a", 10), ("b", 10), ("a", 20)):
        upload(client_fs(s3), tmp_path / run, f"s3://{bucket}/{run}")
        mirror = mirrors.mirror(object_url(f"s3://{bucket}/{run}/checkpoint-{step}"))
        mirror.sync()
        found[run, step] = mirror
    shard = "model.safetensors"
    size = found["a", 10].objects[shard].size
    copies = LocalCopies(tmp_path / "copies", max_bytes=3 * size + size // 2)
    b_copy = copies.copy(found["b", 10], shard)  # b's newest, analysed first
    assert copies.copy(found["a", 10], shard) is not None  # a's, as a checkpoint in hand
    # a's next checkpoint compares with it, and copies itself: a's older one is spent.
    with copies.held([found["a", 10], found["a", 20]], spent=found["a", 10]):
        assert copies.copy(found["a", 10], shard) is not None
        assert copies.copy(found["a", 20], shard) is not None
    FORMATS["safetensors"][0](tmp_path / "c", 30, seed=30)
    upload(client_fs(s3), tmp_path / "c", f"s3://{bucket}/c")
    other = mirrors.mirror(object_url(f"s3://{bucket}/c/checkpoint-30"))
    other.sync()
    assert copies.copy(other, shard) is not None
    assert b_copy is not None and b_copy.exists()  # b's newest stays
    held = {p.read_bytes() for p in (tmp_path / "copies").iterdir()}
    assert held == {
        (tmp_path / run / f"checkpoint-{step}" / shard).read_bytes()
        for run, step in (("b", 10), ("a", 20), ("c", 30))
    }
    mirrors.close()


def test_a_backfill_keeps_the_newest_checkpoints_copy_for_the_next_one(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    """A worker that starts behind analyses the newest checkpoint first, then backfills. Only
    the newest is copied as the checkpoint in hand: backfilled ones are read by ranges, so
    their copies never push out the newest's, and the next new checkpoint reads its base (the
    newest before it) from disk. Room for two checkpoints' weights."""
    written = FORMATS["safetensors"][0](tmp_path / "size", 1, seed=1) / "model.safetensors"
    room = 2 * written.stat().st_size + 1024
    settings = worker_settings(
        pg_url, deltas="prev", analysis_workers=1, base_cache_mb=room / 1024**2
    )
    watcher = Watcher(settings, [object_url(f"s3://{bucket}/run")])
    try:
        for step in (10, 20, 30):
            FORMATS["safetensors"][0](tmp_path / "run", step, seed=step)
        upload(client_fs(s3), tmp_path / "run", f"s3://{bucket}/run")
        assert _analyse_new(watcher, s3) == 3
        gets = {step: _gets(s3, bucket, "run", "safetensors", step) for step in (10, 20, 30)}
        assert gets[30]["model.safetensors"] == 1, gets  # the newest: copied whole
        assert gets[20]["model.safetensors"] > 1, gets  # backfilled: by ranges, not copied
        later = FORMATS["safetensors"][0](tmp_path / "later", 40, seed=40)
        upload(client_fs(s3), later.parent, f"s3://{bucket}/run")
        assert _analyse_new(watcher, s3) == 1
        assert not _gets(s3, bucket, "run", "safetensors", 30), s3.log  # its base, from disk
    finally:
        watcher.close()
