"""The analysis options: read from the settings in one place; workers, traps and order kept."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from alphawatch.settings import Settings
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
from alphawatch.workers.checkpoints import UNCONFINED, iter_layers
from alphawatch.workers.spectral import LayerResult, Thresholds
from alphawatch.workers.spectral.analysis import HOST
from alphawatch.workers.watcher import Watcher


def checkpoint(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            f"model.layers.{i}.mlp.{p}.weight": torch.randn(300, 120 + 10 * i, generator=g)
            for i in range(3)
            for p in ("up_proj", "down_proj")
        },
        str(path),
    )
    return path


def test_settings_reach_the_child_options(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        device="cpu",
        analysis_workers=3,
        check_traps=False,
        fit_method="ks2",
        optimizer_state=True,
        nested_widths=[16, 32],
        crosscheck={"share": 0.25},
        trust={"min_tail": 12},
    )
    options = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
    assert options == AnalysisOptions(
        method="ks2",
        thresholds=Thresholds(min_tail=12),
        device=HOST,
        confine=UNCONFINED,
        optimizer_state=True,
        nested_widths=(16, 32),
        crosscheck_share=0.25,
        workers=3,
        check_traps=False,
    )
    assert AnalysisOptions.from_settings(Settings(), confine=UNCONFINED).check_traps is True
    # The worker's child is sent exactly these options, under the worker's own confinement.
    watcher = Watcher(settings, [tmp_path])
    assert watcher.url_roots == ()  # no URL prefix allowed: the child reads no bucket
    assert watcher.child.options == AnalysisOptions.from_settings(
        settings, confine=watcher.confine, progress=watcher.progress, url_roots=()
    )


def test_parallel_analysis_keeps_reading_order_and_the_trap_switch(tmp_path: Path) -> None:
    path = checkpoint(tmp_path / "model.safetensors")
    names = [m.name for m in iter_layers(path)]

    def run(workers: int, traps: bool) -> list[LayerResult]:
        options = AnalysisOptions(
            method="ww",
            thresholds=Thresholds(),
            device=torch.device("cpu"),
            confine=UNCONFINED,
            workers=workers,
            check_traps=traps,
        )
        layers = analyze_checkpoint(path, path, options).layers
        assert [x.name for x in layers] == names
        assert all((x.rand_evals is not None) == traps for x in layers)
        assert all(x.distance_from_init == 0.0 for x in layers)  # its own first checkpoint
        return [x.result for x in layers]

    one, two, off = run(1, True), run(2, True), run(2, False)
    for a, b in zip(one, two, strict=True):
        assert a.shuffle_traps == b.shuffle_traps and a.num_pl_spikes == b.num_pl_spikes
        assert a.alpha is not None and b.alpha is not None
        assert abs(a.alpha - b.alpha) <= 1e-9 * abs(a.alpha)
    assert all(r.shuffle_traps is None and r.shuffle_distance is None for r in off)
