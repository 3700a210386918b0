"""Update spectra against a run's first checkpoint in a bucket: the base is downloaded once per
worker, then read from its local copy with no request, until its object is replaced; in any
format (safetensors, otherwise read by ranges; torch pickles and DCP folders, otherwise spooled
for each analysis).

A real worker (``Watcher``, its analysis process, PostgreSQL) against a real S3 API on
127.0.0.1 (moto's server mode, every request counted by key).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from alphawatch.locations import object_url
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import UNCONFINED
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows
from tests.factories import worker_settings
from tests.objectstore import CountingServer, client_fs, upload
from tests.workers import hostile
from tests.workers.small import MATRICES, write_checkpoint


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": torch.randn(64, 48, generator=generator) for name in MATRICES}


def write_pickle_checkpoint(run: Path, step: int, *, seed: int) -> Path:
    """``run/checkpoint-<step>/`` as :func:`write_checkpoint`, its weights a torch pickle
    (``pytorch_model.bin``), with the trainer's ``optimizer.pt`` beside them (never read for
    the weights: larger than the weights, as Adam's two moments are)."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    torch.save(_weights(seed), folder / "pytorch_model.bin")
    generator = torch.Generator().manual_seed(seed + 1)
    torch.save({"state": {0: {"exp_avg": torch.randn(256, 256, generator=generator)}}},
               folder / "optimizer.pt")  # fmt: skip
    (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return folder


def write_dcp_checkpoint(run: Path, step: int, *, seed: int) -> Path:
    """``run/step_<step>/``: a torch DCP checkpoint of the same weights, written by two writer
    threads (``.metadata`` and two ``.distcp`` files)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    folder = run / f"step_{step}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saving without a process group is intended here
        dcp.save(_weights(seed), storage_writer=FileSystemWriter(folder, thread_count=2),
                 no_dist=True)  # fmt: skip
    return folder


FORMATS: dict[str, tuple[Callable[..., Path], str]] = {
    # format: its writer, and the name of checkpoint folders ({} the step)
    "safetensors": (write_checkpoint, "checkpoint-{}"),
    "pickle": (write_pickle_checkpoint, "checkpoint-{}"),
    "dcp": (write_dcp_checkpoint, "step_{}"),
}


def _folder(fmt: str, step: int) -> str:
    return FORMATS[fmt][1].format(step)


def _base_gets(s3: CountingServer, bucket: str, fmt: str, step: int) -> Counter[str]:
    """GETs of each object of checkpoint ``step`` since the last reset, by key."""
    prefix = f"/{bucket}/run/{_folder(fmt, step)}/"
    return Counter(
        key.removeprefix(prefix)
        for kind, key, _ in s3.log
        if kind == "GET" and key.startswith(prefix)
    )


def _gets(s3: CountingServer, bucket: str, step: int, fmt: str = "safetensors") -> int:
    """GETs of the objects of checkpoint ``step`` since the last reset."""
    return sum(_base_gets(s3, bucket, fmt, step).values())


def _add(
    s3: CountingServer, tmp_path: Path, url: str, step: int, seed: int, fmt: str = "safetensors"
) -> Path:
    folder = tmp_path / f"upload-{step}-{seed}"
    written = FORMATS[fmt][0](folder, step, seed=seed)
    upload(client_fs(s3), folder, url)
    return written


def _stored_updates(pg_url: str, step: int) -> dict[str, tuple[object, ...]]:
    """The rows of one checkpoint: its weights (distance from init) and ``@delta_init``."""
    found = _rows(
        pg_url,
        'SELECT lm.name, lm.alpha, lm."D", lm.pl_xmin, lm.num_pl_spikes, lm.log_norm, '
        "lm.distance_from_init FROM layer_metric lm JOIN checkpoint c ON c.id = lm.checkpoint_id "
        f"WHERE c.step = {step}",
    )
    return {name: tuple(values) for name, *values in found}


def _ranged_updates(
    url: str, step: int, first_step: int, fmt: str = "safetensors"
) -> dict[str, tuple[object, ...]]:
    """The same rows, from an analysis that reads the base as without a local copy (by ranged
    GETs; pickles and DCP files spooled)."""
    settings = worker_settings("sqlite://", deltas="init", analysis_workers=1)
    options = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
    analysis = analyze_checkpoint(
        object_url(f"{url}/{_folder(fmt, step)}"),
        object_url(f"{url}/{_folder(fmt, first_step)}"),
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


@pytest.mark.parametrize("fmt", ["safetensors", "pickle"])
def test_a_base_larger_than_the_bound_is_read_by_ranges_and_said_once(
    s3: CountingServer,
    bucket: str,
    tmp_path: Path,
    pg_url: str,
    capfd: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    url = f"s3://{bucket}/run"
    _add(s3, tmp_path, url, 10, seed=1, fmt=fmt)
    # 36 KiB of weights, 4 KiB allowed on disk.
    settings = worker_settings(pg_url, deltas="init", analysis_workers=1, base_cache_mb=4 / 1024)
    watcher = Watcher(settings, [url])
    try:
        assert watcher.run_once() == 1  # the first checkpoint: too large to keep, said so
        _add(s3, tmp_path, url, 20, seed=20, fmt=fmt)
        assert _analyse_new(watcher, s3) == 1
        assert _gets(s3, bucket, 10, fmt) > 0  # by ranges or spooled, as without copies
        _same(_stored_updates(pg_url, 20), _ranged_updates(url, 20, 10, fmt))
        assert not any((watcher._objects.base / "bases").iterdir())
    finally:
        watcher.close()
    said = capfd.readouterr().err
    assert said.count("(ALPHAWATCH_BASE_CACHE_MB): it is read by ranged GETs") == 1, said


# What reading each format's weights opens of a checkpoint folder (not optimizer.pt, not
# trainer_state.json); DCP's two writer threads write one .distcp file each.
READ = {"pickle": ["pytorch_model.bin"], "dcp": [".metadata", "__0_0.distcp", "__0_1.distcp"]}


@pytest.mark.parametrize("fmt", ["pickle", "dcp"])
def test_a_pickle_or_dcp_base_is_downloaded_once_not_spooled_at_each_analysis(
    s3: CountingServer, bucket: str, tmp_path: Path, pg_url: str, fmt: str
) -> None:
    url = f"s3://{bucket}/run"
    first = _add(s3, tmp_path, url, 10, seed=1, fmt=fmt)
    # Room for the base's weights (~40 KiB), not for the optimizer.pt beside them (~260 KiB):
    # the trainer's state is never read, so it does not count against the bound.
    settings = worker_settings(pg_url, deltas="init", analysis_workers=1, base_cache_mb=100 / 1024)
    watcher = Watcher(settings, [url])
    copies = watcher._objects.base / "bases"

    def held() -> list[bytes]:
        return sorted(p.read_bytes() for p in copies.iterdir())

    try:
        assert watcher.run_once() == 1  # the first checkpoint: its own copy is made
        for step in (20, 30):
            _add(s3, tmp_path, url, step, seed=step, fmt=fmt)
            assert _analyse_new(watcher, s3) == 1
            # The checkpoint in hand is spooled from the bucket, its base read from disk alone.
            assert _gets(s3, bucket, step, fmt) > 0
            assert _gets(s3, bucket, 10, fmt) == 0, s3.log
            _same(_stored_updates(pg_url, step), _ranged_updates(url, step, 10, fmt))
        assert held() == sorted((first / name).read_bytes() for name in READ[fmt])

        # The base replaced in the bucket (other numbers): each object it reads downloaded
        # once again, never read from its old copy, which is removed.
        replaced = FORMATS[fmt][0](tmp_path / "replaced", 10, seed=7)
        for name in READ[fmt]:
            client_fs(s3).pipe_file(
                f"{bucket}/run/{_folder(fmt, 10)}/{name}", (replaced / name).read_bytes()
            )
        _add(s3, tmp_path, url, 40, seed=40, fmt=fmt)
        assert _analyse_new(watcher, s3) >= 1  # 40, and 10 again (its fingerprint changed)
        assert _base_gets(s3, bucket, fmt, 10) == Counter(dict.fromkeys(READ[fmt], 1))
        _same(_stored_updates(pg_url, 40), _ranged_updates(url, 40, 10, fmt))
        assert held() == sorted((replaced / name).read_bytes() for name in READ[fmt])
    finally:
        watcher.close()


@pytest.mark.parametrize(
    ("build", "refusal"),
    [
        (hostile.code_pickle, "the pickle needs code"),
        (hostile.dcp_metadata_code, "the metadata pickle needs code"),
    ],
)
def test_a_base_that_holds_code_is_refused_from_its_copy_as_from_the_spool(
    s3: CountingServer, bucket: str, tmp_path: Path, build: Callable[..., Path], refusal: str
) -> None:
    """A copy is only where the bytes lie: the same loader reads it, and refuses code."""
    run = tmp_path / "run"
    base = build(run, 10)
    write_checkpoint(run, 20, seed=20)
    upload(client_fs(s3), run, f"s3://{bucket}/run")
    settings = worker_settings("sqlite://", deltas="init", analysis_workers=1)
    spooled = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
    copied = AnalysisOptions.from_settings(
        settings, confine=UNCONFINED, base_copies=tmp_path / "copies"
    )
    checkpoint = object_url(f"s3://{bucket}/run/checkpoint-20")
    first = object_url(f"s3://{bucket}/run/{base.name}")
    prefix = f"/{bucket}/run/{base.name}/"
    expected = analyze_checkpoint(checkpoint, first, spooled)
    for gets in (True, False):  # the copy made, then read from disk
        s3.reset()
        analysis = analyze_checkpoint(checkpoint, first, copied)
        assert analysis.base_error is not None and refusal in analysis.base_error
        assert analysis.base_error == expected.base_error
        assert str(first) in analysis.base_error
        assert "alphawatch-objects-" not in analysis.base_error
        assert [a.name for a in analysis.layers] == [e.name for e in expected.layers]
        assert any(k.startswith(prefix) for kind, k, _ in s3.log if kind == "GET") is gets
    assert any((tmp_path / "copies").iterdir())  # read from its copy, and refused there
    assert not (base / hostile.PWNED).exists()
