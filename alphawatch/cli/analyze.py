"""`analyze`: one checkpoint, no database, as JSON, CSV or a table."""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alphawatch.cli.common import EXIT_OK, UserError, settings_of
from alphawatch.locations import ObjectURL
from alphawatch.settings import Settings
from alphawatch.spreadsheet import write_csv

if TYPE_CHECKING:
    from alphawatch.workers.analyst import AnalysedLayer, AnalysisOptions
    from alphawatch.workers.checkpoints import Confinement
    from alphawatch.workers.checkpoints.bases import BaseMatrices


_COLUMNS = ("name", "shape", "alpha", "D", "xmin", "num_pl_spikes", "fit_status", "trusted")


def analyze_path(
    path: Path | ObjectURL,
    settings: Settings,
    method: str | None = None,
    engine: str = "alphawatch",
    base: Path | None = None,
) -> dict[str, Any]:
    """Analyse one checkpoint (no database) into the public ``analyze`` JSON document.

    ``engine="weightwatcher"``: the fit numbers are weightwatcher 0.7.7's own (its ``analyze()``
    on each matrix), with alphawatch's fit rules applied to them; no bootstrap stability, no
    trap search and no distribution tests, which weightwatcher does not compute.

    An object-store URL is read through a mirror of its objects (ranged reads, a bounded
    spool: ``workers.checkpoints.objects``); the document names the URL.

    ``base``: a checkpoint to compare with; each matrix also gets a ``<layer>@delta`` row (the
    spectrum of W − W_base) and its weight row the distances from it (``change_fro``, ...).
    """
    if isinstance(path, ObjectURL):
        from alphawatch.workers.checkpoints import UNCONFINED
        from alphawatch.workers.checkpoints.objects import staged

        spool = int(settings.spool_max_mb * 1024 * 1024)
        with staged([path], UNCONFINED, None, spool) as (roots, confine, mirrors):
            local = roots[0]
            assert local is not None
            if not local.exists():
                raise UserError(f"{path}: no object at or below this URL")
            try:
                doc = _analyze_local(local, settings, method, engine, confine, base)
            except Exception as exc:
                exc.args = tuple(mirrors.shown(str(a)) for a in exc.args)
                raise
        doc["path"] = str(path)
        return doc
    from alphawatch.workers.checkpoints import UNCONFINED

    return _analyze_local(path, settings, method, engine, UNCONFINED, base)


def _analyze_local(
    path: Path,
    settings: Settings,
    method: str | None,
    engine: str,
    confine: Confinement,
    base: Path | None,
) -> dict[str, Any]:
    from alphawatch.service.robust import summarize
    from alphawatch.vocabulary import DEFAULT_VARIANT, split_variant
    from alphawatch.workers.analyst import AnalysisOptions, analysed_layers, base_readers
    from alphawatch.workers.checkpoints import discover
    from alphawatch.workers.spectral import crosscheck

    # The worker's options, less the live cross-check: that samples the stored layers of a
    # run; here ``--engine weightwatcher`` compares every layer, when asked.
    options = replace(
        AnalysisOptions.from_settings(settings, confine=confine, method=method),
        crosscheck_share=0.0,
    )
    if engine == "weightwatcher" and (reason := crosscheck.unavailable(options.method)):
        raise UserError(f"--engine weightwatcher: {reason}")
    refs = discover(path, settle_s=0.0, confine=confine) if path.is_dir() else []
    step = next((r.step for r in refs if Path(r.path) == path), None)
    bases = base_readers(path, options, base=base)
    if base is not None and not bases:
        raise UserError(f"--base {base}: not a checkpoint apart from {path}")
    if engine == "weightwatcher":
        layers = _weightwatcher_rows(path, options, bases)
    else:
        analysed = analysed_layers(path, None, options, bases=bases)
        layers = [_document_row(layer) for layer in analysed]
    for reader in bases.values():
        if reader.error is not None:
            raise UserError(f"--base {base}: {reader.error}")
    # The summary is the weights' own: gradients and nested slices are rows beside them.
    weights = [r for r in layers if split_variant(r["name"])[1] == DEFAULT_VARIANT]
    return {
        "step": step,
        "path": str(path),
        "device": str(options.device),
        "engine": engine,
        "layers": layers,
        "summary": summarize(weights, thresholds=options.thresholds),
    }


def _document_row(layer: AnalysedLayer) -> dict[str, Any]:
    """A layer of the ``analyze`` document: every metric, then where the matrix sits."""
    row = layer.result.metrics()
    row.update(name=layer.name, kind=layer.kind, block=layer.block)
    if layer.shape is None:
        # A layer that names no matrix (refused optimizer state) has always been printed with
        # the stored row's fields rather than a shape: the public document keeps its keys.
        row.update(dtype=layer.dtype, distance_from_init=layer.distance_from_init)
    else:
        row.update(shape=list(layer.shape), dtype=layer.dtype)
    if layer.distance is not None:
        row.update(
            change_fro=layer.distance.change_fro,
            change_spectral=layer.distance.change_spectral,
            subspace_overlap=layer.distance.subspace_overlap,
            overlap_k=layer.distance.overlap_k,
        )
    return row


def _weightwatcher_rows(
    path: Path, options: AnalysisOptions, bases: dict[str, BaseMatrices]
) -> list[dict[str, Any]]:
    """weightwatcher's own numbers for each matrix, with alphawatch's fit rules applied."""
    from alphawatch.workers.analyst import analysed_matrices
    from alphawatch.workers.spectral import crosscheck

    refused: list[AnalysedLayer] = []
    layers: list[dict[str, Any]] = []
    for matrix in analysed_matrices(path, options, refused, bases=bases):
        row = crosscheck.weightwatcher_row(matrix.weight, options.method)
        status = crosscheck.status_of(row, options.thresholds)
        row.update(
            method=str(options.method),
            fit_status=status.value,
            trusted=status.value == "ok",
            name=matrix.name,
            kind=matrix.kind,
            block=matrix.block,
            shape=list(matrix.weight.shape),
            dtype=str(matrix.stored_dtype).removeprefix("torch."),
        )
        layers.append(row)
    # One pass, one matrix at a time: what was refused was refused after the last matrix.
    return layers + [_document_row(layer) for layer in refused]


def run_analyze(args: argparse.Namespace) -> int:
    from alphawatch.workers.checkpoints import CheckpointError

    path = args.path
    if isinstance(path, Path):
        path = path.expanduser().resolve()
        if not path.exists():
            raise UserError(f"{path} does not exist")
    try:
        base = args.base.expanduser().resolve() if args.base is not None else None
        if base is not None and not base.exists():
            raise UserError(f"--base {base} does not exist")
        doc = analyze_path(path, settings_of(args), args.method, args.engine, base)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    out = sys.stdout
    if args.format == "json":
        json.dump(doc, out, indent=2, default=str)
        out.write("\n")
    elif args.format == "csv":
        keys = list(doc["layers"][0]) if doc["layers"] else list(_COLUMNS)
        # flat cells only, as the API's CSV: the trap localisation is in the JSON document
        write_csv(out, [k for k in keys if k != "trap_localisation"], doc["layers"])
    else:
        out.write(_table(doc))
    return EXIT_OK


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "x".join(map(str, value))
    return "-" if value is None else str(value)


def _table(doc: dict[str, Any]) -> str:
    rows = [[_fmt(layer.get(c)) for c in _COLUMNS] for layer in doc["layers"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(_COLUMNS)]
    buf = io.StringIO()
    buf.write("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)) + "\n")
    for row in rows:
        buf.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + "\n")
    for layer in doc["layers"]:
        if layer.get("fit_status") == "failed" and layer.get("error"):
            # A refused optimizer state (or a matrix that failed) says why, not only "failed".
            buf.write(f"{layer['name']}: {layer['error']}\n")
    summary = doc["summary"]
    buf.write(f"\nstep {doc['step']}: {json.dumps(summary, default=str)}\n")
    return buf.getvalue()
