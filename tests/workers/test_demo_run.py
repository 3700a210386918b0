"""The demo run's study knobs: warm-up, clipping, weight decay, a repeated slice, a held-out loss.

Their defaults leave the demo as it was: naming them with their default values trains the same
weights bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alphawatch.workers.demo_run import train

SMALL = {"steps": 6, "save_every": 3, "d_model": 32, "ffn": 64, "batch_size": 4, "seq_len": 32}


def _weights(folder: Path) -> dict[str, object]:
    return dict(load_file(str(folder / "model.safetensors")))


def test_the_knobs_at_their_defaults_train_the_same_weights(tmp_path: Path) -> None:
    (plain,) = train(tmp_path / "a", **{**SMALL, "save_every": 6})
    (named,) = train(
        tmp_path / "b",
        **{**SMALL, "save_every": 6},
        warmup_steps=0,
        grad_clip=None,
        weight_decay=0.01,
        train_slice=None,
        val_bytes=0,
    )
    a, b = _weights(plain), _weights(named)
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)  # type: ignore[attr-defined]
    # Any knob moved changes the weights: the comparison can fail.
    (other,) = train(tmp_path / "c", **{**SMALL, "save_every": 6}, warmup_steps=3)
    c = _weights(other)
    assert not all(a[k].equal(c[k]) for k in a)  # type: ignore[attr-defined]


def test_a_held_out_loss_is_logged_at_each_save_and_every_entry_is_reported(
    tmp_path: Path,
) -> None:
    seen: list[dict[str, float]] = []
    paths = train(
        tmp_path / "run",
        **SMALL,
        warmup_steps=2,
        grad_clip=1.0,
        weight_decay=0.0,
        train_slice=2_048,
        val_bytes=50_000,
        val_batches=2,
        on_log=seen.append,
    )
    assert [p.name for p in paths] == ["checkpoint-3", "checkpoint-6"]
    history = json.loads((paths[-1] / "trainer_state.json").read_text())["log_history"]
    assert history == seen
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert [s for s, _ in evals] == [3, 6]
    assert all(2.0 < loss < 8.0 for _, loss in evals)  # bytes: ln 256 = 5.5 at random
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 7))


@pytest.mark.parametrize(
    ("knobs", "words"),
    [({"train_slice": 10}, "train_slice 10"), ({"val_bytes": 10}, "val_bytes 10")],
)
def test_impossible_slices_are_refused(tmp_path: Path, knobs: dict[str, int], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        train(tmp_path / "run", **SMALL, **knobs)  # type: ignore[arg-type]
