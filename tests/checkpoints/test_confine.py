"""Confinement: what resolves under a root is read, what leads elsewhere is refused unread."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from alphawatch.workers.checkpoints import (
    UNCONFINED,
    CheckpointError,
    Confinement,
    OutsideRootError,
    discover,
    iter_layers,
)
from alphawatch.workers.checkpoints.completeness import MAX_STEP, StepError, parse_step
from alphawatch.workers.checkpoints.confine import opened_path
from alphawatch.workers.checkpoints.errors import printable


def _weights(folder: Path, prefix: str = "model") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file(
        {f"{prefix}.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g)},
        str(folder / "model.safetensors"),
    )


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Confinement]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    return root, outside, Confinement.to([root])


def test_paths_under_the_root_pass_and_links_out_are_refused(
    roots: tuple[Path, Path, Confinement],
) -> None:
    root, outside, confine = roots
    (outside / "secret").write_bytes(b"secret")
    (root / "inner").write_bytes(b"inner")
    (root / "out").symlink_to(outside / "secret")
    (root / "in").symlink_to(root / "inner")
    assert confine.read_bytes(root / "in") == b"inner"  # a link that stays inside is fine
    with pytest.raises(OutsideRootError) as refused:
        confine.read_bytes(root / "out")
    message = str(refused.value)
    assert str(root / "out") in message and str(outside / "secret") in message
    assert "outside the allowed roots" in message and str(root) in message
    assert UNCONFINED.read_bytes(root / "out") == b"secret"  # analyze PATH reads what it is told
    assert Confinement.to([]).allows(root / "inner") is False  # no root: nothing is allowed


def test_the_opened_descriptor_is_checked_not_the_name(
    roots: tuple[Path, Path, Confinement],
) -> None:
    root, outside, confine = roots
    (outside / "secret").write_bytes(b"secret")
    with (outside / "secret").open("rb") as handle:
        assert opened_path(handle) == outside / "secret"  # what the kernel says was opened
    # The check made after the open sees the real file, whatever the name said before.
    (root / "swapped").symlink_to(outside / "secret")
    with pytest.raises(OutsideRootError), confine.open(root / "swapped"):
        pass


def test_a_root_swapped_for_a_symlink_does_not_move(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "file").write_bytes(b"x")
    confine = Confinement.to([root])
    root.rmdir()
    root.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutsideRootError):
        confine.read_bytes(root / "file")


def test_names_inside_a_checkpoint_are_plain_relative_names(
    roots: tuple[Path, Path, Confinement],
) -> None:
    root, _outside, confine = roots
    assert confine.member(root, "model-00001-of-00002.safetensors", "shard") == (
        root / "model-00001-of-00002.safetensors"
    )
    for name in ("../x.safetensors", "/etc/passwd", "a/../../x", "x\x00y"):
        with pytest.raises(OutsideRootError, match="not a plain relative name"):
            confine.member(root, name, "shard")


def test_side_files_are_read_up_to_a_limit(roots: tuple[Path, Path, Confinement]) -> None:
    root, _outside, confine = roots
    (root / "big.json").write_bytes(b" " * 2048)
    assert len(confine.read_bytes(root / "big.json", limit=2048)) == 2048
    with pytest.raises(CheckpointError, match="larger than 1024 bytes"):
        confine.read_bytes(root / "big.json", "config", limit=1024)


def test_iter_layers_refuses_each_way_out(roots: tuple[Path, Path, Confinement]) -> None:
    root, outside, confine = roots
    _weights(outside / "secret", prefix="secret")
    _weights(root / "good")
    assert [m.name for m in iter_layers(root / "good", confine=confine)] == [
        "model.layers.0.mlp.up_proj"
    ]

    linked = root / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(outside / "secret" / "model.safetensors")
    indexed = root / "indexed"
    indexed.mkdir()
    (indexed / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": str(outside / "secret" / "model.safetensors")}})
    )
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 2, "base_model_name_or_path": str(outside / "secret")})
    )
    save_file(
        {
            "base_model.model.m.lora_A.weight": torch.randn(2, 16),
            "base_model.model.m.lora_B.weight": torch.randn(32, 2),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    for folder, says in (
        (linked, "model.safetensors"),
        (indexed, "shard-index entry"),
        (adapter, "base_model_name_or_path"),
    ):
        with pytest.raises(OutsideRootError, match=says):
            list(iter_layers(folder, confine=confine))
    # Without confinement the same adapter is merged with its base: the refusal above is the
    # confinement's doing, not a broken fixture.
    names = [m.name for m in iter_layers(adapter)]
    assert names == ["m.lora_update"]


def test_discovery_refuses_entries_one_by_one(roots: tuple[Path, Path, Confinement]) -> None:
    root, outside, confine = roots
    run = root / "run"
    for step in (1, 2):
        _weights(run / f"checkpoint-{step}")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    _weights(outside / "checkpoint-3")
    (run / "checkpoint-3").symlink_to(outside / "checkpoint-3", target_is_directory=True)
    _weights(run / f"checkpoint-{MAX_STEP + 1}")
    _weights(run / "checkpoint-4\n")
    refs = discover(run, settle_s=0, confine=confine)
    good = [(r.step, r.complete) for r in refs if r.error is None]
    assert good == [(1, True), (2, True)]
    refused = {r.step: r.error or "" for r in refs if r.error is not None and r.step is not None}
    assert list(refused) == [3] and "outside the allowed roots" in refused[3]
    no_step = [r.error or "" for r in refs if r.error is not None and r.step is None]
    assert len(no_step) == 2
    assert any(f"checkpoint-{MAX_STEP + 1}" in e and "not a step number" in e for e in no_step)
    assert any("checkpoint-4\\n" in e and "not printable" in e for e in no_step)


def test_step_numbers_are_bigint_or_refused() -> None:
    assert parse_step("0007", "x") == 7
    assert parse_step(str(MAX_STEP), "x") == MAX_STEP
    assert parse_step(12.0, "x") == 12
    for bad in (
        str(MAX_STEP + 1),
        "9" * 5000,
        -1,
        1.5,
        float("inf"),
        float("nan"),
        True,
        "٣",
        None,
        [1],
    ):
        with pytest.raises(StepError, match="not a step number"):
            parse_step(bad, "x")


def test_messages_never_carry_raw_control_characters_or_undecodable_bytes() -> None:
    name = os.fsdecode(b"/runs/checkpoint-1\xff\n")
    shown = printable(f"refused: {name}")
    assert shown == "refused: /runs/checkpoint-1\\xff\\n"
    shown.encode("utf-8")  # storable as text in any database
    assert str(CheckpointError(name, f"{name}: bad")).isprintable()


def test_fifos_are_refused_without_blocking(roots: tuple[Path, Path, Confinement]) -> None:
    root, _outside, confine = roots
    os.mkfifo(root / "model.safetensors")
    # A blocking open would wait for a writer forever; the refusal comes at once.
    with pytest.raises(CheckpointError, match="not a regular file"):
        confine.read_bytes(root / "model.safetensors")
    (root / "trainer_state.json").write_text("{}")
    os.mkfifo(root / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json is not a regular file"):
        list(iter_layers(root, confine=confine))


def test_dangling_and_looping_links_are_no_checkpoint(
    roots: tuple[Path, Path, Confinement],
) -> None:
    root, _outside, confine = roots
    run = root / "run"
    _weights(run / "checkpoint-1")
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    (run / "step-2.safetensors").symlink_to(run / "gone.safetensors")
    (run / "step-3.safetensors").symlink_to(run / "step-3.safetensors")
    refs = discover(run, settle_s=0, confine=confine)
    assert [(r.step, r.error) for r in refs] == [(1, None)]
