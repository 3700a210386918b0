"""The analysis child's options: workers and the trap check reach the engine; rows keep order."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from alphawatch.settings import Settings
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.budget import options_of
from alphawatch.workers.checkpoints import UNCONFINED, iter_layers
from alphawatch.workers.spectral import Thresholds


def checkpoint(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file({f"model.layers.{i}.mlp.{p}.weight": torch.randn(300, 120 + 10 * i, generator=g)
               for i in range(3) for p in ("up_proj", "down_proj")}, str(path))
    return path


def test_settings_reach_the_child_options() -> None:
    options = options_of(Settings(analysis_workers=3, check_traps=False), False, None)
    assert options["workers"] == 3 and options["check_traps"] is False
    assert options_of(Settings(), False, None)["check_traps"] is True


def test_parallel_analysis_keeps_reading_order_and_the_trap_switch(tmp_path: Path) -> None:
    path = checkpoint(tmp_path / "model.safetensors")
    names = [m.name for m in iter_layers(path)]

    def run(workers: int, traps: bool) -> list[dict[str, object]]:
        options = AnalysisOptions(method="ww", thresholds=Thresholds(),
                                  device=torch.device("cpu"), confine=UNCONFINED,
                                  workers=workers, check_traps=traps)
        layers, spectra = analyze_checkpoint(path, path, options)
        assert [s["name"] for s in spectra] == names
        assert all((s["rand_evals"] is not None) == traps for s in spectra)
        return layers

    one, two, off = run(1, True), run(2, True), run(2, False)
    assert [r["name"] for r in two] == names
    for a, b in zip(one, two, strict=True):
        assert a["num_traps"] == b["num_traps"] and a["num_pl_spikes"] == b["num_pl_spikes"]
        assert abs(float(a["alpha"]) - float(b["alpha"])) <= 1e-9 * abs(float(a["alpha"]))
        assert b["distance_from_init"] == 0.0  # the checkpoint is its own first one
    assert all(r["num_traps"] is None and r["rand_distance"] is None for r in off)
