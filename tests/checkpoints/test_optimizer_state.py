"""Gradient spectra from optimizer state: a real Trainer run and a real Lightning run.

Each ``<layer>@exp_avg`` matrix must be the very tensor the live optimizer holds for that layer
(named exactly, never guessed), its alpha weightwatcher 0.7.7's on the same tensor, and every
state that cannot be named exactly is refused with a message while the weights are analysed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from alphawatch.trust import Thresholds
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import Confinement, iter_layers
from alphawatch.workers.checkpoints.optimizer import _DECAY_RULES as DECAY_RULES
from alphawatch.workers.checkpoints.optimizer import (
    OptimizerStateRefused,
    decay_parameter_names,
    iter_exp_avg,
)
from tests.checkpoints.training import lightning_run, trainer_run
from tests.spectral.test_parity import ww_row

pytestmark = pytest.mark.slow


def _options(confine: Confinement | None = None, **extra: Any) -> AnalysisOptions:
    return AnalysisOptions(
        method="ww",
        thresholds=Thresholds(),
        device=torch.device("cpu"),
        confine=confine or Confinement(None),
        **extra,
    )


def _live_moments(model: nn.Module, optimizer: Any) -> dict[str, torch.Tensor]:
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate wraps the torch optimizer
    return {
        name.removesuffix(".weight"): inner.state[p]["exp_avg"]
        for name, p in model.named_parameters()
        if p.dim() == 2
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return trainer_run(tmp_path_factory.mktemp("trainer"))


def test_trainer_exp_avg_is_the_live_optimizers_tensor(trained: tuple[Path, Any]) -> None:
    checkpoint, trainer = trained
    live = _live_moments(trainer.model, trainer.optimizer)
    read = {m.name: m for m in iter_exp_avg(checkpoint)}
    weights = {m.name: m for m in iter_layers(checkpoint)}
    assert set(read) == {f"{name}@exp_avg" for name in weights}
    assert len(live) == len(weights)
    for name, moment in live.items():
        matrix = read[f"{name}@exp_avg"]
        # Exactly the tensor the optimizer holds: q and o (same shape) cannot be swapped.
        assert torch.equal(matrix.weight, moment.float()), name
        assert (matrix.kind, matrix.block) == (weights[name].kind, weights[name].block)


def test_our_decay_rule_is_the_installed_trainers(trained: tuple[Path, Any]) -> None:
    _, trainer = trained
    current = next(iter(DECAY_RULES.values()))
    assert decay_parameter_names(trainer.model, current) == trainer.get_decay_parameter_names(
        trainer.model
    )


def test_exp_avg_alpha_is_weightwatchers(trained: tuple[Path, Any]) -> None:
    checkpoint, trainer = trained
    layers = analyze_checkpoint(checkpoint, None, _options(optimizer_state=True)).layers
    rows = {r.name: r.result for r in layers}
    live = _live_moments(trainer.model, trainer.optimizer)
    compared = 0
    for name, moment in live.items():
        row = rows[f"{name}@exp_avg"]
        linear = nn.Linear(moment.shape[1], moment.shape[0], bias=False)
        # The moment as analysed: scaled to a mean eigenvalue of 1 (alpha is scale-free, and
        # weightwatcher's absolute floor of 1e-5 would drop most of a raw gradient's spectrum).
        scaled = moment.double() * min(moment.shape) ** 0.5 / torch.linalg.norm(moment.double())
        linear.weight.data = scaled.float()
        expected = ww_row(nn.Sequential(linear))
        assert row.alpha == pytest.approx(expected["alpha"], rel=1e-6), name
        assert row.num_pl_spikes == int(expected["num_pl_spikes"]), name
        assert row.log_norm == pytest.approx(np.log10(min(moment.shape)), rel=1e-5)
        compared += 1
    assert compared == 16
    # The weights are there as before, under their own names.
    assert sum("@" not in n for n in rows) == 16


def test_off_by_default(trained: tuple[Path, Any]) -> None:
    layers = analyze_checkpoint(trained[0], None, _options()).layers
    assert not [r for r in layers if "@" in r.name]


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / checkpoint.name))


def _refusal(path: Path, confine: Confinement | None = None) -> str:
    layers = analyze_checkpoint(path, None, _options(confine, optimizer_state=True)).layers
    assert sum("@" not in r.name for r in layers) == 16, "the weights are analysed all the same"
    refused = [r for r in layers if r.name == "optimizer_state@exp_avg"]
    assert len(refused) == 1 and refused[0].result.fit_status == "failed"
    assert not [r for r in layers if r.name.endswith("@exp_avg") and r is not refused[0]]
    return str(refused[0].result.error)


def test_group_sizes_that_no_layout_gives_are_refused(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    checkpoint = _copy(trained[0], tmp_path)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    first, second = state["param_groups"]
    # One index moved from the decay group to the other: sizes no Trainer rule produces.
    second["params"] = [first["params"].pop(), *second["params"]]
    torch.save(state, checkpoint / "optimizer.pt")
    message = _refusal(checkpoint)
    assert "no parameter layout matches it exactly" in message
    assert "group sizes [15, 6]" in message


def test_a_moment_of_another_shape_is_refused(trained: tuple[Path, Any], tmp_path: Path) -> None:
    checkpoint = _copy(trained[0], tmp_path)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    # Indices 1 and 2 are layer 0's q (48x48) and k (24x48): swapped, the shapes disagree.
    state["state"][1], state["state"][2] = state["state"][2], state["state"][1]
    torch.save(state, checkpoint / "optimizer.pt")
    assert (
        "has shape (24, 48), but model.layers.0.self_attn.q_proj.weight has (48, 48)"
        in _refusal(checkpoint)
    )


def test_a_config_without_architecture_is_refused(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    checkpoint = _copy(trained[0], tmp_path)
    config = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(config.replace('"LlamaForCausalLM"', '"MyLlama"'))
    assert "'MyLlama' is not part of transformers" in _refusal(checkpoint)


def test_state_of_an_optimizer_without_exp_avg_is_refused(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    checkpoint = _copy(trained[0], tmp_path)
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    state["state"] = {i: {"momentum_buffer": s["exp_avg"]} for i, s in state["state"].items()}
    torch.save(state, checkpoint / "optimizer.pt")
    assert "not an Adam-like optimizer" in _refusal(checkpoint)


def test_an_optimizer_pickle_with_code_is_refused(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    checkpoint = _copy(trained[0], tmp_path)
    torch.save({"state": {}, "param_groups": [], "why": Path("x")}, checkpoint / "optimizer.pt")
    assert "the pickle needs code" in _refusal(checkpoint)


def test_an_optimizer_file_outside_the_roots_is_never_read(
    trained: tuple[Path, Any], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    checkpoint = _copy(trained[0], root)
    outside = tmp_path / "elsewhere.pt"
    shutil.move(checkpoint / "optimizer.pt", outside)
    os.symlink(outside, checkpoint / "optimizer.pt")
    message = _refusal(checkpoint, Confinement.to([root]))
    assert "outside the allowed roots" in message


def test_missing_optimizer_state_is_said(
    trained: tuple[Path, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alphawatch.cli import main

    checkpoint = _copy(trained[0], tmp_path)
    (checkpoint / "optimizer.pt").unlink()
    assert "no optimizer state beside the weights" in _refusal(checkpoint)
    with pytest.raises(OptimizerStateRefused):
        list(iter_exp_avg(checkpoint))
    assert main(["analyze", str(checkpoint), "--optimizer-state", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "optimizer_state@exp_avg: " in table and "no optimizer state beside" in table


def test_lightning_exp_avg_is_the_live_optimizers_tensor(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    ckpt, trainer = lightning_run(tmp_path)
    live = _live_moments(trainer.lightning_module, trainer.optimizers[0])
    read = {m.name: m for m in iter_exp_avg(ckpt)}
    weights = {m.name for m in iter_layers(ckpt)}
    assert set(read) == {f"{name}@exp_avg" for name in weights}
    for name, moment in live.items():
        assert torch.equal(read[f"{name}@exp_avg"].weight, moment.float()), name


def test_lightning_with_several_groups_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    ckpt, _ = lightning_run(tmp_path, groups=2)
    with pytest.raises(OptimizerStateRefused, match="2 parameter groups"):
        list(iter_exp_avg(ckpt))


def test_analyze_command_adds_gradients_and_widths_beside_the_weights(
    trained: tuple[Path, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from alphawatch.cli import main

    assert (
        main(
            [
                "analyze",
                str(trained[0]),
                "--optimizer-state",
                "--nested-widths",
                "64,32",
                "--device",
                "cpu",
                "--format",
                "json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    variants = [r["name"].partition("@")[2] or "weight" for r in doc["layers"]]
    assert {v: variants.count(v) for v in set(variants)} == {
        "weight": 16,
        "exp_avg": 16,
        "w32": 6,
        "w64": 6,
    }
    # The summary is the weights' own.
    assert doc["summary"]["n_layers"] == 16
    with pytest.raises(SystemExit):  # argparse refuses a width that is not positive
        main(["analyze", str(trained[0]), "--nested-widths", "0,32"])


def test_settings_read_widths_and_optimizer_state_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from alphawatch.settings import Settings

    monkeypatch.setenv("ALPHAWATCH_NESTED_WIDTHS", "2048,1024,2048")
    monkeypatch.setenv("ALPHAWATCH_OPTIMIZER_STATE", "true")
    settings = Settings()
    assert settings.nested_widths == [1024, 2048] and settings.optimizer_state
    assert Settings().model_copy().nested_widths == [1024, 2048]
    monkeypatch.setenv("ALPHAWATCH_NESTED_WIDTHS", "1024,-5")
    with pytest.raises(ValidationError):
        Settings()
    assert Settings(nested_widths=[]).nested_widths == []


def _dcp_run(folder: Path, rename: str = "") -> tuple[Path, nn.Module, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from transformers import LlamaForCausalLM

    from tests.checkpoints.training import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        ids = torch.randint(0, 96, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weights, state = get_state_dict(model, optimizer)
    weights = {f"{rename}{k}": v for k, v in weights.items()}
    with pytest.warns(UserWarning, match="torch.distributed"):
        dcp.save({"model": weights, "optim": state}, checkpoint_id=str(folder), no_dist=True)
    return folder, model, optimizer


def test_dcp_exp_avg_is_the_live_optimizers_tensor(tmp_path: Path) -> None:
    checkpoint, model, optimizer = _dcp_run(tmp_path / "step_2")
    live = _live_moments(model, optimizer)
    read = {m.name: m for m in iter_exp_avg(checkpoint)}
    weights = {m.name: m for m in iter_layers(checkpoint)}
    # DCP keys carry the top-level key the weights were saved under: "model." + the name.
    assert set(read) == {f"{name}@exp_avg" for name in weights}
    for name, moment in live.items():
        matrix = read[f"model.{name}@exp_avg"]
        assert torch.equal(matrix.weight, moment.float()), name
        assert (matrix.kind, matrix.block) == (
            weights[f"model.{name}"].kind,
            weights[f"model.{name}"].block,
        )


def test_dcp_moments_that_name_no_weight_exactly_are_refused(tmp_path: Path) -> None:
    # Weights saved under other names: "model.renamed_model.embed_tokens.weight" does not end
    # with the parameter name "model.embed_tokens.weight" at a dot.
    checkpoint, _, _ = _dcp_run(tmp_path / "step_2", rename="renamed_")
    with pytest.raises(OptimizerStateRefused, match="which matches 0 weight tensors"):
        list(iter_exp_avg(checkpoint))
