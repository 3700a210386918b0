"""Runs in Google Cloud Storage (``gs://``), against a local GCS emulator through gcsfs.

The emulator is gcp-storage-emulator (pure Python, in the dev extra), pointed at by the
standard ``STORAGE_EMULATOR_HOST``; skipped where it or gcsfs is not installed. The same
fsspec code paths as S3: discovery, completeness, ranged reads, and the numbers of the same
files read from disk.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gcp_storage_emulator")
if importlib.util.find_spec("gcsfs") is None:  # imported by the fixture, its variables set
    pytest.skip("gcsfs is not installed (pip install 'alphawatch[cloud]')", allow_module_level=True)

from alphawatch.cli import analyze_path
from alphawatch.locations import object_url
from alphawatch.settings import Settings
from alphawatch.workers.checkpoints import Confinement, survey
from alphawatch.workers.checkpoints.objects import Mirrors, ObjectConfinement
from alphawatch.workers.watcher import Watcher
from tests.db import rows
from tests.factories import worker_settings
from tests.objectstore import upload
from tests.pg import free_port
from tests.workers.small import write_checkpoint

BUCKET = "runs-gcs"


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A GCS emulator on 127.0.0.1 with the bucket ``runs-gcs``; a gcsfs client for uploads."""
    from gcp_storage_emulator.server import create_server

    # gcsfs's experimental hierarchical-namespace probe asks a gRPC control API the emulator
    # does not serve (a minute's timeout per bucket): off, as for any emulator. The variable
    # is read when gcsfs is imported; where another test imported it first, its plain file
    # system is put back in fsspec's registry for this test.
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import gcsfs
    import gcsfs.core

    registry = importlib.import_module("fsspec.registry")  # the module, not fsspec.registry
    plain = gcsfs.core.GCSFileSystem
    monkeypatch.setattr(gcsfs, "GCSFileSystem", plain)
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry._registry, protocol, plain)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")

    try:
        yield gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    finally:
        server.stop()


def _alphas(layers: list[dict[str, Any]]) -> dict[str, float | None]:
    return {layer["name"]: layer["alpha"] for layer in layers}


def test_a_run_in_a_gcs_bucket_is_discovered_and_analysed_as_on_disk(
    gcs: Any, tmp_path: Path, pg_url: str
) -> None:
    run = tmp_path / "run"
    for step, seed in ((10, 1), (20, 2)):
        write_checkpoint(run, step, seed=seed)
    url = f"gs://{BUCKET}/team/run"
    upload(gcs, run, url)

    # Discovery through the mirror: what the same files on disk give.
    mirrors = Mirrors()
    try:
        root = mirrors.sync(object_url(url))
        confine = ObjectConfinement.around(Confinement.to([]), mirrors, (url,))
        remote = survey(root, settle_s=0.0, confine=confine).refs
    finally:
        mirrors.close()
    local = survey(run, settle_s=0.0).refs
    assert [(r.step, r.format, r.complete, r.error) for r in remote] == [
        (r.step, r.format, r.complete, r.error) for r in local
    ]
    assert [r.step for r in remote] == [10, 20]

    # A worker registers and analyses it; the numbers are those of the files on disk.
    settings = worker_settings(pg_url, allowed_roots=[f"gs://{BUCKET}/team"])
    watcher = Watcher(settings, [url])
    try:
        assert watcher.run_once() == 2
    finally:
        watcher.close()
    assert sorted(rows(pg_url, "SELECT step, path, status FROM checkpoint")) == [
        (step, f"{url}/checkpoint-{step}", "done") for step in (10, 20)
    ]
    ours = analyze_path(object_url(f"{url}/checkpoint-20"), Settings(device="cpu"))
    theirs = analyze_path(run / "checkpoint-20", Settings(device="cpu"))
    a, b = _alphas(ours["layers"]), _alphas(theirs["layers"])
    assert set(a) == set(b) and a
    for name, alpha in b.items():
        assert alpha is not None and math.isclose(a[name] or 0.0, alpha, rel_tol=1e-12), name
    assert rows(pg_url, "SELECT count(*) FROM layer_metric") == [(2 * len(b),)]
