"""``alphawatch analyze --format json``: the public document, key for key, in the engine's numbers.

Other tools parse this document; the analysis loop behind it is the worker's own
(``analyst.analysed_layers``). These tests pin the keys and their order, and check every value
against the engine run directly on each matrix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from alphawatch.cli import analyze_path
from alphawatch.settings import Settings
from alphawatch.workers.checkpoints import iter_layers
from alphawatch.workers.spectral import LayerResult, analyze_matrix

ROOT = Path(__file__).resolve().parents[1]
# The eigenvalue arrays are the spectrum table's, never a key of the document.
METRICS = [f.name for f in fields(LayerResult) if f.name not in ("evals", "rand_evals")]
VARIES = {"elapsed_ms"}  # wall time of each matrix
# Read off the shuffle's float32 Gram matrix, whose sums BLAS orders by its thread count: the
# document analyses matrices side by side on one thread each, this test one at a time on all.
FLOAT32_SHUFFLE = {"max_rand_eval", "rand_distance", "shuffle_distance"}


def _same(got: Any, want: Any, key: str = "") -> bool:
    if isinstance(want, float) and isinstance(got, float):
        if key in FLOAT32_SHUFFLE:  # float32 sums: ~1e-7 relative each
            return got == pytest.approx(want, rel=1e-5, abs=1e-6, nan_ok=True)
        return got == pytest.approx(want, rel=1e-9, nan_ok=True)
    return bool(got == want)


def test_the_json_document_keeps_its_keys_and_the_engines_numbers(tiny_run: Path) -> None:
    path = tiny_run / "checkpoint-20"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alphawatch",
            "analyze",
            str(path),
            "--format",
            "json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        check=True,
    )
    doc = json.loads(done.stdout)
    assert list(doc) == ["step", "path", "device", "engine", "layers", "summary"]
    assert (doc["step"], doc["path"], doc["device"], doc["engine"]) == (
        20,
        str(path),
        "cpu",
        "alphawatch",
    )
    # Pretty-printed with two spaces, one trailing newline: what scripts diff against.
    assert done.stdout == json.dumps(doc, indent=2) + "\n"

    thresholds = Settings().trust
    matrices = list(iter_layers(path))
    assert [layer["name"] for layer in doc["layers"]] == [m.name for m in matrices]
    for layer, matrix in zip(doc["layers"], matrices, strict=True):
        assert list(layer) == [*METRICS, "name", "kind", "block", "shape", "dtype"]
        assert (layer["kind"], layer["block"], layer["shape"], layer["dtype"]) == (
            matrix.kind,
            matrix.block,
            list(matrix.weight.shape),
            str(matrix.stored_dtype).removeprefix("torch."),
        )
        want = analyze_matrix(
            matrix.weight, stored_dtype=matrix.stored_dtype, thresholds=thresholds
        ).metrics()
        for key in METRICS:
            if key not in VARIES:
                assert _same(layer[key], want[key], key), (matrix.name, key)


def test_refused_optimizer_state_keeps_its_row_of_the_document(
    tiny_run: Path, tmp_path: Path
) -> None:
    path = Path(shutil.copytree(tiny_run / "checkpoint-20", tmp_path / "checkpoint-20"))
    (path / "optimizer.pt").write_bytes(b"not a pickle")
    doc = analyze_path(path, Settings(device="cpu", optimizer_state=True))
    [refused] = [r for r in doc["layers"] if r["name"] == "optimizer_state@exp_avg"]
    assert (refused["fit_status"], refused["trusted"]) == ("failed", False)
    assert "optimizer.pt" in refused["error"]
    # A row that names no matrix has no shape; it has always carried these keys instead.
    assert list(refused) == [*METRICS, "name", "kind", "block", "dtype", "distance_from_init"]
    assert [r["name"] for r in doc["layers"] if r is not refused] == [
        m.name for m in iter_layers(path)
    ]
