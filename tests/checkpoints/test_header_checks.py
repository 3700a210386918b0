"""What discovery parses in the worker's own process: bounded, and once per version of a file.

A valid 95 MB header used to be parsed whole beside the API at every poll (1.25 GB peak, the
API held up for seconds under ``up``), and a file growing by a byte every 2 s was parsed again
at every poll; shard indexes and ``trainer_state.json`` were parsed up to 64 MiB (JSON of small
objects takes ~25 times its size). Measured with bench/bench_big_header.py.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from alphawatch.workers.checkpoints import Confinement, discover
from alphawatch.workers.checkpoints.completeness import HEADERS, PARSE_MAX


def _shard(path: Path, header_bytes: int, short: int = 0) -> None:
    """A valid safetensors file of 1-element float32 tensors, its header about this long."""
    entries, offset, size = [], 0, 2
    while size < header_bytes:
        entry = (
            f'"t.{offset // 4}":{{"dtype":"F32","shape":[1],"data_offsets":[{offset},'
            f"{offset + 4}]}}"
        )
        entries.append(entry)
        size += len(entry) + 1
        offset += 4
    raw = ("{" + ",".join(entries) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * (offset - short))


def _checkpoint(run: Path, step: int, header_bytes: int, short: int = 0) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    _shard(folder / "model.safetensors", header_bytes, short)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_header_larger_than_discovery_parses_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _checkpoint(run, 5, PARSE_MAX + 1024)  # a valid file: only its size is wrong for us
    _checkpoint(run, 6, 64 * 1024)
    refs = {r.step: r for r in discover(run, settle_s=0.0, confine=Confinement.to([run]))}
    assert refs[5].error is not None
    assert str(run / "checkpoint-5" / "model.safetensors") in refs[5].error
    assert f"more than the {PARSE_MAX} that discovery parses" in refs[5].error
    assert refs[6].complete and refs[6].error is None


def test_an_unchanged_shard_is_parsed_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _checkpoint(run, 1, 4096)
    before = HEADERS.parsed
    for _ in range(5):
        (ref,) = discover(run, settle_s=30.0)
        assert ref.reason == "model.safetensors complete"
    assert HEADERS.parsed == before + 1


def test_a_shard_that_keeps_changing_is_parsed_once_per_settle_period(tmp_path: Path) -> None:
    run = tmp_path / "run"
    folder = _checkpoint(run, 1, 4096, short=2)
    shard = folder / "model.safetensors"
    now = time.time()
    before = HEADERS.parsed
    (ref,) = discover(run, settle_s=30.0, now=now)
    assert not ref.complete and "incomplete safetensors file" in ref.reason
    for second in range(1, 4):  # a byte every second: parsed no more
        with shard.open("ab") as out:
            out.write(b"\0")
        (ref,) = discover(run, settle_s=30.0, now=now + second)
        assert not ref.complete and "still changing" in ref.reason
    assert HEADERS.parsed == before + 1
    # A settle period after the last parse, the shard is parsed again (and whole or not, the
    # folder has been left alone for as long: judged as settled).
    (ref,) = discover(run, settle_s=30.0, now=now + 31)
    assert HEADERS.parsed == before + 2


def test_a_shard_index_larger_than_discovery_parses_is_refused(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "run", 7, 4096)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = json.dumps({"weight_map": {"t.0": "model-00001-of-00001.safetensors"}})
    # Valid JSON (whitespace may pad it), one byte past what discovery parses.
    (folder / "model.safetensors.index.json").write_text(index + " " * (PARSE_MAX + 1 - len(index)))
    (ref,) = discover(tmp_path / "run", settle_s=0.0)
    assert ref.error is not None and "model.safetensors.index.json" in ref.error
    assert f"larger than {PARSE_MAX} bytes" in ref.error


def test_a_trainer_state_larger_than_discovery_parses_waits_for_the_files_to_settle(
    tmp_path: Path,
) -> None:
    folder = _checkpoint(tmp_path / "run", 8, 4096)
    state = json.dumps({"global_step": 8, "log_history": []})
    (folder / "trainer_state.json").write_text(state + " " * (PARSE_MAX + 1 - len(state)))
    (ref,) = discover(tmp_path / "run", settle_s=30.0)
    assert not ref.complete and ref.error is None
    assert f"larger than discovery parses ({PARSE_MAX} bytes)" in ref.reason
    (ref,) = discover(tmp_path / "run", settle_s=30.0, now=time.time() + 31)
    assert ref.complete and ref.step == 8 and "files settled" in ref.reason
