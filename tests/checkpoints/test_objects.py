"""Runs in object storage, against a real S3 API on 127.0.0.1 (moto's server) through s3fs.

Discovery, completeness without renames (uploads in the wrong order, half-uploaded shards),
ranged reads (no whole safetensors file is ever fetched), the bounded spool for pickles,
hostile objects, and the numbers: an analysis of a checkpoint in a bucket equals the analysis
of the same files on disk, byte for byte.
"""

from __future__ import annotations

import json
import time
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
from alphawatch.workers.checkpoints import (
    UNCONFINED,
    CheckpointError,
    Confinement,
    OutsideRootError,
    objects,
    survey,
)
from alphawatch.workers.checkpoints.objects import (
    LocalCopies,
    Mirrors,
    ObjectConfinement,
    run_url_check,
)
from tests.objectstore import (
    CountingServer,
    client_fs,
    upload,
)
from tests.workers import hostile
from tests.workers.small import write_checkpoint


def _options(**extra: Any) -> AnalysisOptions:
    settings = Settings(device="cpu", analysis_workers=1)
    return AnalysisOptions.from_settings(settings, confine=UNCONFINED, **extra)


def _survey(
    url: str, *, settle_s: float = 0.0, now: float | None = None
) -> tuple[list[Any], Mirrors]:
    mirrors = Mirrors()
    root = mirrors.sync(object_url(url))
    confine = ObjectConfinement.around(Confinement.to([]), mirrors, (url,))
    return survey(root, settle_s=settle_s, now=now, confine=confine).refs, mirrors


def _sharded(run: Path, step: int) -> Path:
    """``checkpoint-<step>`` with two safetensors shards and their index, HF's layout."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(step)
    shards = {
        "model-00001-of-00002.safetensors": ["model.layers.0.mlp.up_proj.weight"],
        "model-00002-of-00002.safetensors": ["model.layers.0.mlp.down_proj.weight"],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: torch.randn(64, 48, generator=generator) for k in keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_discovery_of_a_bucket_matches_the_same_files_on_disk(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=1)
    write_checkpoint(run, 20, seed=2)
    _sharded(run, 30)
    torch.save({"w": torch.randn(8, 8)}, run / "model_step40.pt")
    (run / "checkpoint-50.tmp").mkdir()  # a temporary folder: left out, as on disk
    (run / "checkpoint-50.tmp" / "x.safetensors").write_bytes(b"x")
    upload(client_fs(s3), run, f"s3://{bucket}/team/run")

    local = survey(run, settle_s=0.0)
    # A placeholder's mtime is its object's last-modified second plus a fraction drawn from its
    # version (objects._stamp): up to 1 s past the upload. Settled as of one second later, as
    # the local files are now; asked at once, the lone pickle (settled by time alone) could
    # still be in its last second.
    refs, mirrors = _survey(f"s3://{bucket}/team/run", now=time.time() + 1.0)
    assert [(r.step, r.format, r.complete, r.error) for r in refs] == [
        (r.step, r.format, r.complete, r.error) for r in local.refs
    ]
    assert [r.step for r in refs] == [10, 20, 30, 40]
    # Every ref names its object through the mirror, as stored: its URL.
    assert [mirrors.text(r.path) for r in refs][:2] == [
        f"s3://{bucket}/team/run/checkpoint-10",
        f"s3://{bucket}/team/run/checkpoint-20",
    ]


def test_completeness_waits_for_what_the_checkpoint_declares(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """No rename on a bucket: the marker and the index can land first, a shard half-written."""
    folder = _sharded(tmp_path / "run", 5)
    fs = client_fs(s3)
    base = f"{bucket}/run/checkpoint-5"
    # The marker and the index first (the wrong order for a rename-free store).
    for name in ("trainer_state.json", "model.safetensors.index.json"):
        fs.pipe_file(f"{base}/{name}", (folder / name).read_bytes())
    # settle_s of an hour: only what the files declare can make the checkpoint complete.
    refs, _ = _survey(f"s3://{bucket}/run", settle_s=3600)
    assert [(r.step, r.complete) for r in refs] == [(5, False)]
    assert "model-00001-of-00002.safetensors" in refs[0].reason

    # One shard half-uploaded: present, but shorter than its header declares.
    whole = (folder / "model-00001-of-00002.safetensors").read_bytes()
    fs.pipe_file(f"{base}/model-00001-of-00002.safetensors", whole[: len(whole) // 2])
    fs.pipe_file(
        f"{base}/model-00002-of-00002.safetensors",
        (folder / "model-00002-of-00002.safetensors").read_bytes(),
    )
    refs, _ = _survey(f"s3://{bucket}/run", settle_s=3600)
    assert not refs[0].complete
    assert "incomplete safetensors file" in refs[0].reason

    fs.pipe_file(f"{base}/model-00001-of-00002.safetensors", whole)
    refs, _ = _survey(f"s3://{bucket}/run", settle_s=3600)
    assert [(r.step, r.complete) for r in refs] == [(5, True)]


def _rows(analysis: Any) -> list[str]:
    """Every field of every layer but the time it took."""
    return [
        repr(replace(layer, result=replace(layer.result, elapsed_ms=0.0)))
        for layer in analysis.layers
    ]


def test_an_analysis_in_a_bucket_equals_the_same_files_on_disk_by_ranged_reads(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=1)
    _sharded(run, 20)
    upload(client_fs(s3), run, f"s3://{bucket}/run")
    options = _options()
    local = analyze_checkpoint(run / "checkpoint-20", run / "checkpoint-10", options)
    s3.reset()
    s3.log.clear()
    remote = analyze_checkpoint(
        object_url(f"s3://{bucket}/run/checkpoint-20"),
        object_url(f"s3://{bucket}/run/checkpoint-10"),
        options,
    )
    # Every number, eigenvalue and distance from init, byte for byte.
    assert _rows(remote) == _rows(local)
    assert len(remote.layers) == 2
    counts = s3.snapshot()
    assert counts.get("PUT", 0) == 0 and counts.get("HEAD", 0) == 0 and counts["LIST"] == 2
    # No safetensors object is fetched whole: each GET is a range, at most one tensor long
    # (64 x 48 float32), or the 8-byte prefix and the header.
    tensor_bytes = 64 * 48 * 4
    gets = [
        (key, rng) for kind, key, rng in s3.log if kind == "GET" and key.endswith(".safetensors")
    ]
    assert gets and all(rng is not None for _, rng in gets), gets
    for _, rng in gets:
        first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
        assert last - first + 1 <= tensor_bytes
    # Two prefixes + two headers + one tensor per shard (20), and 3 of the first checkpoint (10).
    assert len(gets) <= 2 * 3 + 2 + 2 * 1 + 2 + 3


def test_a_torch_pickle_in_a_bucket_is_spooled_and_read_as_on_disk(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    generator = torch.Generator().manual_seed(3)
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=generator)}
    torch.save(state, run / "model_step7.pt")
    upload(client_fs(s3), run, f"s3://{bucket}/run")
    options = _options()
    local = analyze_checkpoint(run / "model_step7.pt", None, options)
    remote = analyze_checkpoint(object_url(f"s3://{bucket}/run/model_step7.pt"), None, options)
    assert _rows(remote) == _rows(local)

    # The spool is bounded: a checkpoint larger than the bound is refused, never downloaded.
    size = (run / "model_step7.pt").stat().st_size
    with pytest.raises(CheckpointError, match="more than the 100 an analysis may download"):
        analyze_checkpoint(
            object_url(f"s3://{bucket}/run/model_step7.pt"), None, _options_spool(100)
        )
    assert size > 100


def _options_spool(limit: int) -> AnalysisOptions:
    return replace(_options(), spool_max_bytes=limit)


@pytest.mark.parametrize(
    "build",
    [
        hostile.lying_safetensors,
        hostile.overlapping_safetensors,
        hostile.code_pickle,
        hostile.lying_torch_storage,
        hostile.memory_bomb,
        hostile.dcp_metadata_code,
        hostile.dcp_metadata_lie,
    ],
)
def test_hostile_objects_are_refused_as_hostile_files_are(
    s3: CountingServer, bucket: str, tmp_path: Path, build: Any
) -> None:
    folder = build(tmp_path / "run", 3)
    upload(client_fs(s3), tmp_path / "run", f"s3://{bucket}/run")
    url = object_url(f"s3://{bucket}/run/{folder.name}")
    with pytest.raises(Exception) as on_disk:
        analyze_checkpoint(folder, None, _options())
    with pytest.raises(Exception) as in_bucket:
        analyze_checkpoint(url, None, _options())
    # The same refusal as on disk, naming the URL, never the mirror's temporary folder.
    assert type(in_bucket.value) is type(on_disk.value)
    assert isinstance(on_disk.value, CheckpointError | ValueError)
    assert str(in_bucket.value).replace(str(url), "<ckpt>") == str(on_disk.value).replace(
        str(folder), "<ckpt>"
    )
    assert "alphawatch-objects-" not in str(in_bucket.value)
    assert not (folder / hostile.PWNED).exists()


def test_nothing_outside_the_allowed_prefixes_is_requested(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    write_checkpoint(tmp_path / "run", 10, seed=1)
    upload(client_fs(s3), tmp_path / "run", f"s3://{bucket}/secret/run")
    s3.reset()
    url = object_url(f"s3://{bucket}/secret/run/checkpoint-10")
    with pytest.raises(OutsideRootError, match="outside the allowed roots"):
        run_url_check(url, (f"s3://{bucket}/team",))
    with pytest.raises(OutsideRootError, match="outside the allowed roots"):
        analyze_checkpoint(url, None, _options(url_roots=(f"s3://{bucket}/team",)))
    assert s3.snapshot() == {}


def test_keys_that_are_not_plain_names_get_no_placeholder(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    write_checkpoint(tmp_path / "run", 10, seed=1)
    fs = client_fs(s3)
    upload(fs, tmp_path / "run", f"s3://{bucket}/run")
    # S3 keys are free text: "." and ".." segments would step out of the mirror.
    fs.pipe_file(f"{bucket}/run/checkpoint-20/../../../escape.safetensors", b"x" * 16)
    fs.pipe_file(f"{bucket}/run/./checkpoint-30/model.safetensors", b"x" * 16)
    mirrors = Mirrors()
    mirror = mirrors.mirror(object_url(f"s3://{bucket}/run"))
    mirror.sync()
    listed = sorted(mirror.objects)
    assert all(".." not in k.split("/") and "." not in k.split("/") for k in listed), listed
    assert all(str(p).startswith(str(mirrors.base)) for p in mirrors.base.rglob("*"))
    assert not (mirrors.base.parent / "escape.safetensors").exists()
    if len(mirror.problems) == 0:
        pytest.skip("the store normalised the keys itself: nothing left to refuse")
    assert all("plain segments" in p for p in mirror.problems)


def test_an_object_replaced_after_its_listing_is_never_read_mixed(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """Each ranged read carries the listed version: a replaced object is 'vanished'."""
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=1)
    upload(client_fs(s3), run, f"s3://{bucket}/run")
    mirrors = Mirrors()
    root = mirrors.sync(object_url(f"s3://{bucket}/run"))
    confine = ObjectConfinement.around(Confinement.to([]), mirrors, None)
    shard = root / "checkpoint-10" / "model.safetensors"
    with confine.open(shard) as handle:
        assert handle.read(8)  # the listed version
        write_checkpoint(tmp_path / "other", 10, seed=2)  # same size, other bytes
        client_fs(s3).pipe_file(
            f"{bucket}/run/checkpoint-10/model.safetensors",
            (tmp_path / "other" / "checkpoint-10" / "model.safetensors").read_bytes(),
        )
        with pytest.raises(FileNotFoundError, match="replaced while being read"):
            handle.read(8)


def test_analyze_reads_a_url_as_it_reads_a_folder(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    from alphawatch.cli import analyze_path

    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=1)
    upload(client_fs(s3), run, f"s3://{bucket}/run")
    settings = Settings(device="cpu", analysis_workers=1)
    local = analyze_path(run / "checkpoint-10", settings)
    remote = analyze_path(object_url(f"s3://{bucket}/run/checkpoint-10"), settings)
    assert remote["path"] == f"s3://{bucket}/run/checkpoint-10"
    assert remote["step"] == local["step"] == 10
    for doc in (local, remote):
        for layer in doc["layers"]:
            layer.pop("elapsed_ms", None)
    assert remote["layers"] == local["layers"] and remote["summary"] == local["summary"]


def _dcp_checkpoint(folder: Path, seed: int) -> dict[str, int]:
    """A real torch DCP checkpoint written by two writer threads (two ``.distcp`` files);
    the size of each file."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    generator = torch.Generator().manual_seed(seed)
    state = {
        f"model.layers.{i}.mlp.{kind}_proj.weight": torch.randn(64, 48, generator=generator)
        for i in range(2)
        for kind in ("up", "down")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saving without a process group is intended here
        dcp.save({"model": state}, storage_writer=FileSystemWriter(folder, thread_count=2),
                 no_dist=True)  # fmt: skip
    sizes = {p.name: p.stat().st_size for p in folder.glob("*.distcp")}
    assert len(sizes) == 2 and (folder / ".metadata").is_file()
    return sizes


def test_a_dcp_checkpoint_is_complete_only_when_its_data_is_whole(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """DCP writes ``.metadata`` last, but a bucket has no rename: an uploader can put it
    first, and a ``.distcp`` can land cut short. Neither counts as complete."""
    folder = tmp_path / "run" / "step_10"
    sizes = _dcp_checkpoint(folder, seed=1)
    first, second = sorted(sizes)
    fs = client_fs(s3)
    base = f"{bucket}/run/step_10"
    url = f"s3://{bucket}/run"
    # .metadata first (the wrong order), then one data file: the other is missing.
    fs.pipe_file(f"{base}/.metadata", (folder / ".metadata").read_bytes())
    fs.pipe_file(f"{base}/{first}", (folder / first).read_bytes())
    refs, _ = _survey(url, settle_s=3600)
    assert [(r.step, r.format, r.complete) for r in refs] == [(10, "dcp", False)]
    assert f"{second} is missing" in refs[0].reason

    # The second half-uploaded: listed, but shorter than the bytes its records reach.
    whole = (folder / second).read_bytes()
    fs.pipe_file(f"{base}/{second}", whole[: len(whole) // 2])
    refs, _ = _survey(url, settle_s=3600)
    assert not refs[0].complete
    assert f"holds {len(whole) // 2} of the {sizes[second]} bytes" in refs[0].reason

    # Left that way for settle_s (by the objects' last-modified times): analysed, so that it
    # fails visibly with the file named.
    refs, _ = _survey(url, settle_s=60, now=time.time() + 61)
    assert refs[0].complete and refs[0].reason.startswith("marker present but")
    with pytest.raises(CheckpointError) as cut:
        analyze_checkpoint(object_url(f"{url}/step_10"), None, _options())
    assert f"{url}/step_10" in str(cut.value)

    # Whole: complete, and read as the same files on disk are.
    fs.pipe_file(f"{base}/{second}", whole)
    refs, _ = _survey(url, settle_s=3600)
    assert [(r.step, r.complete) for r in refs] == [(10, True)]
    assert refs[0].reason == ".metadata written and its 2 data file(s) whole"
    local = analyze_checkpoint(folder, None, _options())
    remote = analyze_checkpoint(object_url(f"{url}/step_10"), None, _options())
    assert _rows(remote) == _rows(local) and len(local.layers) == 4


def test_a_dcp_folder_on_disk_follows_the_same_rule(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "step_20"
    sizes = _dcp_checkpoint(folder, seed=2)
    name = sorted(sizes)[0]
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:100])
    [ref] = survey(tmp_path / "run", settle_s=3600).refs
    assert not ref.complete and f"holds 100 of the {sizes[name]} bytes" in ref.reason
    (folder / name).write_bytes(data)
    [ref] = survey(tmp_path / "run", settle_s=3600).refs
    assert ref.complete
    # Metadata that names a data file outside the folder is refused, not waited for (the
    # name keeps its length: "__0_0.distcp" -> "../x/.distcp", the pickle stays well formed).
    metadata = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(
        metadata.replace(name.encode(), b"../x/" + name[5:].encode())
    )
    [ref] = survey(tmp_path / "run", settle_s=3600).refs
    assert ref.error is not None and "is not a plain relative name" in ref.error, ref
    # Metadata naming code is never run by discovery: not complete until settled, then
    # handed to the analysis (which refuses it, tests/workers/hostile.py).
    (folder / ".metadata").write_bytes(b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.")
    [ref] = survey(tmp_path / "run", settle_s=3600).refs
    assert not ref.complete and "global os.system is not DCP metadata" in ref.reason
    [ref] = survey(tmp_path / "run", settle_s=0).refs
    assert ref.complete


def test_local_copies_keep_the_bound_evict_the_least_recent_and_never_use_a_partial_one(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """Two runs' bases compete for room for one: the least recently used goes; a copy that is
    not whole (a download cut short, a copy cut on disk) is never read."""
    mirrors = Mirrors()
    bases = []
    for name, seed in (("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / name, 10, seed=seed)
        upload(client_fs(s3), tmp_path / name, f"s3://{bucket}/{name}")
        mirror = mirrors.mirror(object_url(f"s3://{bucket}/{name}/checkpoint-10"))
        mirror.sync()
        bases.append(mirror)
    shard = "model.safetensors"
    size = bases[0].objects[shard].size
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "left-by-a-killed-process.part123").write_bytes(b"x" * 100)
    copies = LocalCopies(folder, max_bytes=size + size // 2)
    assert not any(folder.iterdir())  # a partial download is removed, never used
    assert all(copies.admits(base) for base in bases)

    def copy(base: Any) -> tuple[bytes, int]:
        s3.reset()
        path = copies.copy(base, shard)
        assert path is not None and path.parent == folder
        return path.read_bytes(), s3.snapshot().get("GET", 0)

    a_bytes = (tmp_path / "a" / "checkpoint-10" / shard).read_bytes()
    assert copy(bases[0]) == (a_bytes, 1)  # downloaded once, whole
    assert copy(bases[0]) == (a_bytes, 0)  # then read from disk
    b_bytes, gets = copy(bases[1])  # no room for both: a's copy goes
    assert gets == 1 and b_bytes == (tmp_path / "b" / "checkpoint-10" / shard).read_bytes()
    assert [p.stat().st_size for p in folder.iterdir()] == [size]
    assert copy(bases[0]) == (a_bytes, 1)
    [held] = folder.iterdir()
    with open(held, "r+b") as cut:
        cut.truncate(size - 1)
    assert copy(bases[0]) == (a_bytes, 1)  # a copy of another size is downloaded again
    # A base larger than the bound is left to ranged reads.
    assert not LocalCopies(folder, max_bytes=size - 1).admits(bases[0])


def test_a_disk_without_room_for_a_copy_leaves_the_base_to_ranged_reads(
    s3: CountingServer,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The copies' bound is not the disk: where a copy would leave it all but full (or the
    disk refuses the write), the base is read by ranges, never an analysis failed."""
    write_checkpoint(tmp_path / "a", 10, seed=1)
    upload(client_fs(s3), tmp_path / "a", f"s3://{bucket}/a")
    mirrors = Mirrors()
    mirror = mirrors.mirror(object_url(f"s3://{bucket}/a/checkpoint-10"))
    mirror.sync()
    folder = tmp_path / "copies"
    mirror.copies = LocalCopies(folder, max_bytes=2**40)
    monkeypatch.setattr(objects, "FREE_MARGIN_BYTES", 2**62)  # no disk has that much free
    confine = ObjectConfinement.around(Confinement.to([]), mirrors, None)
    shard = "model.safetensors"
    with confine.open(mirror.path(shard)) as handle:
        read = handle.read()
    assert read == (tmp_path / "a" / "checkpoint-10" / shard).read_bytes()
    assert mirror.copies is None and not any(folder.iterdir())
    assert "read by ranged GETs" in caplog.text


def test_a_pickle_base_is_copied_within_the_bound_counting_only_what_is_read(
    s3: CountingServer, bucket: str, tmp_path: Path
) -> None:
    """A base's size is what its reading opens (not the optimizer state beside the weights),
    and no copy ever takes a base's copies past the bound, whatever that count judged."""
    folder = tmp_path / "run" / "checkpoint-10"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.randn(64, 48, generator=generator)},
               folder / "pytorch_model.bin")  # fmt: skip
    torch.save({"state": {0: {"exp_avg": torch.randn(128, 128, generator=generator)}}},
               folder / "optimizer.pt")  # fmt: skip
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    upload(client_fs(s3), tmp_path / "run", f"s3://{bucket}/run")
    mirror = Mirrors().mirror(object_url(f"s3://{bucket}/run/checkpoint-10"))
    mirror.sync()
    weights = mirror.objects["pytorch_model.bin"].size
    assert mirror.objects["optimizer.pt"].size > weights
    copies = LocalCopies(tmp_path / "copies", max_bytes=weights + 1024)
    assert copies.admits(mirror)  # optimizer.pt is not counted: reading weights never opens it
    s3.reset()
    path = copies.copy(mirror, "pytorch_model.bin")
    assert path is not None and path.read_bytes() == (folder / "pytorch_model.bin").read_bytes()
    assert s3.snapshot().get("GET", 0) == 1
    assert copies.copy(mirror, "optimizer.pt") is None  # opened after all: past the bound
    assert sum(p.stat().st_size for p in (tmp_path / "copies").iterdir()) == weights
    assert not LocalCopies(tmp_path / "small", max_bytes=weights - 1).admits(mirror)
