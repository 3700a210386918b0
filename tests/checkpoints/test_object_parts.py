"""A large tensor in a bucket is fetched as concurrent ranged GETs, each part written into the
tensor's buffer, and the numbers are those of the same file on disk.

Against a real S3 API on 127.0.0.1 (moto's server) through s3fs; the part size is made small
so that a small real checkpoint has tensors of several parts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

import torch
from safetensors.torch import save_file

from alphawatch.locations import object_url
from alphawatch.settings import Settings
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import UNCONFINED, Confinement, objects
from alphawatch.workers.checkpoints.objects import Mirrors, ObjectConfinement
from tests.objectstore import CountingServer, client_fs, upload

PART = 16 * 1024
SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (256, 96),
    "model.layers.0.self_attn.q_proj.weight": (96, 96),
}


def _checkpoint(run: Path, step: int) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    save_file(
        {name: torch.randn(*shape, generator=generator) for name, shape in SHAPES.items()},
        str(folder / "model.safetensors"),
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def _rows(analysis: Any) -> list[str]:
    return [
        repr(replace(layer, result=replace(layer.result, elapsed_ms=0.0)))
        for layer in analysis.layers
    ]


def _options() -> AnalysisOptions:
    return AnalysisOptions.from_settings(
        Settings(device="cpu", analysis_workers=1), confine=UNCONFINED
    )


@pytest.fixture
def run(s3: CountingServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run of one checkpoint on disk, uploaded to ``s3://<bucket>/run``; parts of PART."""
    monkeypatch.setattr(objects, "PART_BYTES", PART)
    folder = tmp_path / "run"
    _checkpoint(folder, 10)
    upload(client_fs(s3), folder, f"s3://{bucket}/run")
    return folder


def test_a_large_tensor_is_read_in_parallel_parts_with_the_numbers_of_disk(
    s3: CountingServer, bucket: str, run: Path
) -> None:
    local = analyze_checkpoint(run / "checkpoint-10", None, _options())
    s3.reset()
    s3.log.clear()
    remote = analyze_checkpoint(object_url(f"s3://{bucket}/run/checkpoint-10"), None, _options())
    assert _rows(remote) == _rows(local)
    assert len(remote.layers) == 2

    ranges = sorted(
        tuple(int(x) for x in rng.removeprefix("bytes=").split("-"))
        for kind, key, rng in s3.log
        if kind == "GET" and key.endswith(".safetensors") and rng is not None
    )
    parts = [(first, last) for first, last in ranges if last - first + 1 == PART]
    # The 256 x 96 float32 tensor (96 KiB) is six parts of 16 KiB, side by side; the 96 x 96
    # one (36 KiB) is two parts and a tail; the prefix and header are reads of their own.
    assert len(parts) == 6 + 2, ranges
    assert all(last - first + 1 <= PART for first, last in ranges)
    data = (run / "checkpoint-10" / "model.safetensors").stat().st_size
    covered = sum(last - first + 1 for first, last in ranges)
    assert covered <= data  # nothing fetched twice, nothing beyond the file


def test_a_part_of_an_object_replaced_mid_read_is_a_vanished_file(
    s3: CountingServer, bucket: str, run: Path, tmp_path: Path
) -> None:
    """Every part carries the listed version: a replaced object is never read mixed."""
    mirrors = Mirrors()
    root = mirrors.sync(object_url(f"s3://{bucket}/run"))
    confine = ObjectConfinement.around(Confinement.to([]), mirrors, None)
    other = _checkpoint(tmp_path / "other", 11)
    with confine.open(root / "checkpoint-10" / "model.safetensors") as handle:
        assert handle.read(8)
        client_fs(s3).pipe_file(
            f"{bucket}/run/checkpoint-10/model.safetensors",
            (other / "model.safetensors").read_bytes(),
        )
        buffer = bytearray(4 * PART)
        with pytest.raises(FileNotFoundError, match="replaced while being read"):
            handle.readinto(buffer)
