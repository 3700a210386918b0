"""Update spectra and layer distances on real checkpoint files: ``analyze --base`` equal to
weightwatcher 0.7.7 on the difference matrices, base checkpoints read one matrix at a time, and
a real worker on a real training run storing ``@delta_init``/``@delta_prev`` rows and distances
that the API serves, ranks and exports."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import load_file
from safetensors.torch import save_file
from torch import nn

from alphawatch.cli import analyze_path
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.analyst import AnalysisOptions, analysed_layers, base_readers
from alphawatch.workers.checkpoints import UNCONFINED, iter_layers
from alphawatch.workers.checkpoints.bases import BaseMatrices
from alphawatch.workers.watcher import Watcher
from tests.db import rows as _rows
from tests.factories import worker_settings

SHAPES = {
    "model.layers.0.mlp.up_proj": (256, 128),
    "model.layers.0.mlp.down_proj": (128, 320),
    "model.layers.0.self_attn.q_proj": (200, 200),
}


def _pair(folder: Path, seed: int) -> tuple[Path, Path]:
    """A base and a later checkpoint: heavy-tailed weights, and a heavy-tailed low-rank-ish
    update on top (what training adds), both float32 safetensors files."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(3.0))
    torch.manual_seed(seed)
    base, later = {}, {}
    for name, (rows, cols) in SHAPES.items():
        w0 = torch.randn(rows, cols, generator=g) / np.sqrt(cols)
        update = t.sample((rows, 24)) @ torch.randn(24, cols, generator=g) / np.sqrt(cols * 24)
        update += 0.2 * t.sample((rows, cols)) / np.sqrt(cols)
        base[f"{name}.weight"] = w0
        later[f"{name}.weight"] = w0 + 0.5 * update
    paths = []
    for step, tensors in ((100, base), (200, later)):
        path = folder / f"checkpoint-{step}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "model.safetensors"))
        (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        paths.append(path)
    return paths[0], paths[1]


def _weightwatcher(weight: np.ndarray) -> dict[str, float]:
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = torch.from_numpy(weight.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = ww.WeightWatcher(model=nn.Sequential(layer)).analyze().iloc[0]
    return {k: float(row[k]) for k in ("alpha", "D", "xmin", "num_pl_spikes")}


@pytest.mark.parametrize("seed", [0, 1])
def test_analyze_base_equals_weightwatcher_on_the_difference(tmp_path: Path, seed: int) -> None:
    base, later = _pair(tmp_path, seed)
    doc = analyze_path(later, Settings(device="cpu"), base=base)
    rows = {r["name"]: r for r in doc["layers"]}
    assert set(rows) == set(SHAPES) | {f"{n}@delta" for n in SHAPES}
    # The difference is formed here from the files, independently of alphawatch's readers.
    before, after = load_file(base / "model.safetensors"), load_file(later / "model.safetensors")
    for name in SHAPES:
        delta = after[f"{name}.weight"] - before[f"{name}.weight"]
        expected = _weightwatcher(delta)
        ours = rows[f"{name}@delta"]
        assert ours["alpha"] == pytest.approx(expected["alpha"], rel=1e-5)
        assert ours["D"] == pytest.approx(expected["D"], rel=1e-5, abs=1e-12)
        assert ours["xmin"] == pytest.approx(expected["xmin"], rel=1e-5)
        assert ours["num_pl_spikes"] == int(expected["num_pl_spikes"])
        assert ours["kind"] == rows[name]["kind"] and ours["shape"] == rows[name]["shape"]
        # The weight row carries its distance from the base.
        norm = np.linalg.norm(after[f"{name}.weight"].astype(np.float64))
        assert rows[name]["change_fro"] == pytest.approx(np.linalg.norm(delta) / norm, rel=1e-5)
    # The summary is the weights' own: the update rows are beside them, never in it.
    alone = analyze_path(later, Settings(device="cpu"))
    assert doc["summary"] == alone["summary"]
    assert {r["name"] for r in alone["layers"]} == set(SHAPES)


def test_analyze_refuses_a_base_that_is_the_checkpoint(tmp_path: Path) -> None:
    from alphawatch.cli.common import UserError

    _, later = _pair(tmp_path, 0)
    with pytest.raises(UserError, match="--base"):
        analyze_path(later, Settings(device="cpu"), base=later)


def test_base_is_read_one_matrix_at_a_time_in_any_order(tmp_path: Path) -> None:
    base, later = _pair(tmp_path, 2)
    names = [m.name for m in iter_layers(later)]
    # Same order: each base matrix is the next one read, and nothing is held ahead.
    reader = BaseMatrices(base)
    for name in names:
        assert reader.take(name) is not None
        assert not reader._ahead  # held nothing beyond the matrix handed out
    assert reader.passes == 1 and reader.matrices_read == len(names)
    assert reader.take(names[0]) is None  # each is handed out once
    # Another order (a torch pickle written in reverse) with room for one matrix ahead:
    # the reader reads again rather than hold more, and hands out the same matrices.
    reversed_base = tmp_path / "reversed.bin"
    tensors = load_file(base / "model.safetensors")
    torch.save({k: torch.from_numpy(tensors[k]) for k in reversed(list(tensors))}, reversed_base)
    small = BaseMatrices(reversed_base, max_ahead_bytes=1)
    for name in names:
        got = small.take(name)
        assert got is not None
        np.testing.assert_array_equal(np.asarray(got), tensors[f"{name}.weight"])
        assert len(small._ahead) <= 1
    assert small.passes > 1
    assert small.take("model.layers.9.mlp.up_proj") is None  # not in the base: None, no error
    # A base that cannot be read is a reference only: no rows, an error saying why.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad = BaseMatrices(broken)
    assert bad.take(names[0]) is None and bad.error is not None


def test_worker_deltas_options_make_rows_beside_the_weights(tmp_path: Path) -> None:
    base, later = _pair(tmp_path, 3)
    options = AnalysisOptions.from_settings(
        Settings(device="cpu", deltas=["init", "prev"]), confine=UNCONFINED
    )
    assert options.deltas == ("init", "prev") and options.reads_previous
    bases = base_readers(later, options, first=base, prev=base)
    layers = analysed_layers(later, base, options, bases=bases)
    names = [x.name for x in layers]
    first = names[0]
    assert names[:3] == [first, f"{first}@delta_init", f"{first}@delta_prev"]
    assert len(names) == 3 * len(SHAPES)
    # Both updates are the same difference here, so the same spectrum.
    by_name = {x.name: x for x in layers}
    for name in SHAPES:
        a, b = by_name[f"{name}@delta_init"].result, by_name[f"{name}@delta_prev"].result
        assert a.alpha == b.alpha and a.num_pl_spikes == b.num_pl_spikes
        assert by_name[name].distance is not None
        assert by_name[name].distance_from_init == pytest.approx(
            by_name[name].distance.change_fro
            * np.linalg.norm(load_file(later / "model.safetensors")[f"{name}.weight"])
            / np.linalg.norm(load_file(base / "model.safetensors")[f"{name}.weight"]),
            rel=1e-5,
        )
    # "distances" alone reads the previous checkpoint for the distances, and makes no rows.
    only = AnalysisOptions.from_settings(
        Settings(device="cpu", deltas="distances"), confine=UNCONFINED
    )
    layers = analysed_layers(later, None, only, bases=base_readers(later, only, prev=base))
    assert sorted(x.name for x in layers) == sorted(SHAPES)
    assert all(x.distance is not None for x in layers)


def _files(folder: Path) -> dict[str, np.ndarray]:
    return {
        k.removesuffix(".weight"): v
        for k, v in load_file(folder / "model.safetensors").items()
        if v.ndim == 2
    }


def test_real_run_stores_serves_and_exports_deltas(
    tiny_run: Path, tmp_path: Path, pg_url: str
) -> None:
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    settings = worker_settings(pg_url, deltas="init,prev")
    watcher = Watcher(settings, [run])
    try:
        assert watcher.run_once() == 3  # claimed newest first: 30, then 10, then 20
    finally:
        watcher.close()
    stored = _rows(
        pg_url,
        "SELECT c.step, lm.name, lm.change_fro, lm.change_spectral, lm.subspace_overlap, "
        "lm.change_ref_step, lm.alpha FROM layer_metric lm "
        "JOIN checkpoint c ON c.id = lm.checkpoint_id",
    )
    by = {(r[0], r[1]): r for r in stored}
    weights = sorted({name for _, name in by if "@" not in name})
    steps = {10: _files(run / "checkpoint-10"), 20: _files(run / "checkpoint-20"),
             30: _files(run / "checkpoint-30")}  # fmt: skip
    compared = [n for n in weights if n in steps[10]]
    assert len(compared) >= 8
    for name in compared:
        assert (10, f"{name}@delta_init") not in by and (10, f"{name}@delta_prev") not in by
        assert by[(10, name)][2] is None  # the first checkpoint has nothing before it
        for step, ref in ((20, 10), (30, 20)):
            assert (step, f"{name}@delta_init") in by and (step, f"{name}@delta_prev") in by
            _, _, fro, spectral, overlap, ref_step, _ = by[(step, name)]
            now, then = steps[step][name].astype(np.float64), steps[ref][name].astype(np.float64)
            delta = now - then
            # The checkpoint before by step, though 30 was analysed before 20 existed in the
            # database's results.
            assert ref_step == ref
            assert fro == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(now), rel=1e-6)
            assert spectral == pytest.approx(
                np.linalg.norm(delta, 2) / np.linalg.norm(now, 2), rel=1e-6
            )
            assert 0.0 <= overlap <= 1.0

    with TestClient(create_app(settings)) as client:
        run_id = client.get("/api/v1/runs").json()["runs"][0]["id"]
        variants = {
            v["name"]: v for v in client.get(f"/api/v1/runs/{run_id}/variants").json()["variants"]
        }
        assert {"weight", "delta_init", "delta_prev"} <= set(variants)
        assert variants["delta_prev"]["source"] == "delta_prev"
        # Whole-model statistics are the weights' only.
        trend = client.get(f"/api/v1/runs/{run_id}/trend", params={"filter": "all"}).json()
        assert all(p["n_used"] + p["n_excluded"] == len(weights) for p in trend["points"])
        update = client.get(
            f"/api/v1/runs/{run_id}/trend", params={"filter": "all", "variant": "delta_prev"}
        ).json()
        assert [p["step"] for p in update["points"] if p["n_used"]] == [20, 30]

        answer = client.get(f"/api/v1/runs/{run_id}/distances").json()
        assert answer["steps"] == [10, 20, 30] and set(answer["layers"]) == set(weights)
        i = answer["layers"].index(compared[0])
        assert answer["change_fro"][i][0] is None
        assert answer["change_fro"][i][2] == pytest.approx(by[(30, compared[0])][2])
        assert answer["ref_steps"][i] == [None, 10, 20]

        ranked = client.get(
            f"/api/v1/runs/{run_id}/distances", params={"from_step": 10, "to_step": 30}
        ).json()["ranking"]
        values = [r["change_fro"] for r in ranked if r["change_fro"] is not None]
        assert values == sorted(values, reverse=True)
        top = ranked[0]
        name = top["layer"]
        assert top["complete"] and top["n_steps"] == 2
        assert top["change_fro"] == pytest.approx(by[(20, name)][2] + by[(30, name)][2])
        assert top["delta_alpha"] == pytest.approx(by[(30, name)][6] - by[(10, name)][6])
        one = client.get(
            f"/api/v1/runs/{run_id}/distances",
            params={"from_step": 20, "rank_by": "subspace_overlap"},
        ).json()
        assert one["to_step"] == 30
        overlaps = [r["subspace_overlap"] for r in one["ranking"] if r["subspace_overlap"]]
        assert overlaps == sorted(overlaps)  # the most rotated first

        # Two steps in either order are one interval; to_step alone is from the step before.
        reverse = client.get(
            f"/api/v1/runs/{run_id}/distances", params={"from_step": 30, "to_step": 10}
        ).json()
        assert (reverse["from_step"], reverse["to_step"]) == (10, 30)
        assert reverse["ranking"] == ranked
        alone = client.get(f"/api/v1/runs/{run_id}/distances", params={"to_step": 30}).json()
        assert (alone["from_step"], alone["to_step"]) == (20, 30)
        assert alone["ranking"] == one["ranking"] or {r["layer"] for r in alone["ranking"]} == {
            r["layer"] for r in one["ranking"]
        }
        same = client.get(
            f"/api/v1/runs/{run_id}/distances", params={"from_step": 20, "to_step": 20}
        ).json()["ranking"]
        assert all(r["n_steps"] == 0 and not r["complete"] for r in same)
        assert all(r["delta_alpha"] in (0.0, None) for r in same)
        for params, code in (
            ({"from_step": 15}, 404),
            ({"to_step": 25}, 404),
            ({"rank_by": "alpha"}, 422),
            ({"max_points": 1}, 422),
        ):
            response = client.get(f"/api/v1/runs/{run_id}/distances", params=params)
            assert response.status_code == code, (params, response.text)
            assert "detail" in response.json()
        assert client.get("/api/v1/runs/999/distances").status_code == 404

        exported = client.get(f"/api/v1/runs/{run_id}/distances.csv")
        assert exported.status_code == 200
        assert exported.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(table) == 2 * len(weights)
        row = next(r for r in table if r["layer"] == compared[0] and r["step"] == "30")
        assert float(row["change_fro"]) == pytest.approx(by[(30, compared[0])][2])
        assert row["ref_step"] == "20"
        assert client.get("/api/v1/runs/999/distances.csv").status_code == 404
