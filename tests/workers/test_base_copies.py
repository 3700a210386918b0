"""Update spectra against a run's first checkpoint in a bucket: the base is downloaded once per
worker, then read from its local copy with no request, until its object is replaced.

A real worker (``Watcher``, its analysis process, PostgreSQL) against a real S3 API on
127.0.0.1 (moto's server mode, every request counted by key).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from alphawatch.locations import object_url
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import UNCONFINED
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows
from tests.factories import worker_settings
from tests.objectstore import CountingServer, client_fs, upload
from tests.workers.small import write_checkpoint


def _gets(s3: CountingServer, bucket: str, step: int) -> int:
    """GETs of the objects of ``checkpoint-<step>`` since the last reset."""
    prefix = f"/{bucket}/run/checkpoint-{step}/"
    return sum(1 for kind, key, _ in s3.log if kind == "GET" and key.startswith(prefix))


def _add(s3: CountingServer, tmp_path: Path, url: str, step: int, seed: int) -> None:
    folder = tmp_path / f"upload-{step}-{seed}"
    write_checkpoint(folder, step, seed=seed)
    upload(client_fs(s3), folder, url)


def _stored_updates(pg_url: str, step: int) -> dict[str, tuple[object, ...]]:
    """The rows of one checkpoint: its weights (distance from init) and ``@delta_init``."""
    found = _rows(
        pg_url,
        'SELECT lm.name, lm.alpha, lm."D", lm.pl_xmin, lm.num_pl_spikes, lm.log_norm, '
        "lm.distance_from_init FROM layer_metric lm JOIN checkpoint c ON c.id = lm.checkpoint_id "
        f"WHERE c.step = {step}",
    )
    return {name: tuple(values) for name, *values in found}


def _ranged_updates(url: str, step: int, first_step: int) -> dict[str, tuple[object, ...]]:
    """The same rows, from an analysis that reads the base by ranged GETs (no local copy)."""
    settings = worker_settings("sqlite://", deltas="init", analysis_workers=1)
    options = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
    analysis = analyze_checkpoint(
        object_url(f"{url}/checkpoint-{step}"),
        object_url(f"{url}/checkpoint-{first_step}"),
        options,
    )
    return {
        layer.name: (
            layer.result.alpha,
            layer.result.D,
            layer.result.xmin,
            layer.result.num_pl_spikes,
            layer.result.log_norm,
            layer.distance_from_init,
        )
        for layer in analysis.layers
    }


def _same(stored: dict[str, tuple[object, ...]], ranged: dict[str, tuple[object, ...]]) -> None:
    assert sum("@delta_init" in name for name in stored) == 3
    assert stored.keys() == ranged.keys()
    for name, values in stored.items():
        for ours, theirs in zip(values, ranged[name], strict=True):
            if isinstance(ours, float) and isinstance(theirs, float):
                assert math.isclose(ours, theirs, rel_tol=1e-12), name
            else:
                assert ours == theirs, name


def _analyse_new(watcher: Watcher, s3: CountingServer) -> int:
    """Register what is new, then analyse every queued checkpoint with requests counted from
    then on (discovery's own reads of new markers and headers left out)."""
    watcher.discover_once()
    s3.reset()
    done = 0
    while watcher.process_one():
        done += 1
    return done


def test_the_first_checkpoint_is_downloaded_once_and_again_when_replaced(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str
) -> None:
    url = f"s3://{bucket}/run"
    _add(s3, tmp_path, url, 10, seed=1)
    watcher = Watcher(worker_settings(pg_url, deltas="init", analysis_workers=1), [url])
    try:
        assert watcher.run_once() == 1  # the first checkpoint: its own copy is made
        for step in (20, 30):
            _add(s3, tmp_path, url, step, seed=step)
            assert _analyse_new(watcher, s3) == 1
            # The checkpoint in hand is read from the bucket, its base from disk alone.
            assert _gets(s3, bucket, step) > 0
            assert _gets(s3, bucket, 10) == 0, s3.log
            _same(_stored_updates(pg_url, step), _ranged_updates(url, step, 10))

        # The base replaced in the bucket (same size, other numbers): downloaded again, never
        # read from the old copy.
        replaced = tmp_path / "replaced"
        write_checkpoint(replaced, 10, seed=7)
        client_fs(s3).pipe_file(
            f"{bucket}/run/checkpoint-10/model.safetensors",
            (replaced / "checkpoint-10" / "model.safetensors").read_bytes(),
        )
        _add(s3, tmp_path, url, 40, seed=40)
        assert _analyse_new(watcher, s3) >= 1  # 40, and 10 again (its fingerprint changed)
        gets = [k for kind, k, _ in s3.log if kind == "GET" and k.endswith("10/model.safetensors")]
        assert len(gets) == 1, gets  # one whole download, then read from disk
        _same(_stored_updates(pg_url, 40), _ranged_updates(url, 40, 10))
        # Only the copy of the base as now listed is on disk (its weights: what is read).
        [copy] = (watcher._objects.base / "bases").iterdir()
        assert copy.read_bytes() == (replaced / "checkpoint-10" / "model.safetensors").read_bytes()
    finally:
        watcher.close()


def test_a_base_larger_than_the_bound_is_read_by_ranges_and_said_once(
    s3: CountingServer,
    bucket: str,
    tmp_path: Path,
    pg_url: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    url = f"s3://{bucket}/run"
    _add(s3, tmp_path, url, 10, seed=1)
    # 36 KiB of weights, 4 KiB allowed on disk.
    settings = worker_settings(pg_url, deltas="init", analysis_workers=1, base_cache_mb=4 / 1024)
    watcher = Watcher(settings, [url])
    try:
        assert watcher.run_once() == 1  # the first checkpoint: too large to keep, said so
        _add(s3, tmp_path, url, 20, seed=20)
        assert _analyse_new(watcher, s3) == 1
        assert _gets(s3, bucket, 10) > 0  # by ranges, as without copies
        _same(_stored_updates(pg_url, 20), _ranged_updates(url, 20, 10))
        assert not any((watcher._objects.base / "bases").iterdir())
    finally:
        watcher.close()
    said = capfd.readouterr().err
    assert said.count("(ALPHAWATCH_BASE_CACHE_MB): it is read by ranged GETs") == 1, said
