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


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The emulator's downloads made to follow GCS on ``generation=``: the bytes of that
    generation while it is live, 404 once it is replaced (a bucket without versioning); the
    emulator itself serves the live bytes whatever the generation asked. Returns the
    generations the downloads named, in order."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    asked: list[str] = []

    def download(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        wanted = request.query.get("generation")
        if wanted:
            asked.append(wanted[0])
            try:
                live = storage.get_file_obj(
                    request.params["bucket_name"], request.params["object_id"]
                )["generation"]
            except NotFound:
                live = None
            if live != wanted[0]:
                response.status = HTTPStatus.NOT_FOUND
                return None
        return objects.download(request, response, storage, *args, **kwargs)

    for _, handlers in server.HANDLERS:
        if handlers.get(server.GET) is objects.download:
            monkeypatch.setitem(handlers, server.GET, download)
    return asked


def test_a_gcs_object_replaced_after_its_listing_is_never_read_mixed(
    gcs: Any, generations: list[str], tmp_path: Path
) -> None:
    """Each ranged read names the listed generation: a replaced object is 'vanished'."""
    run = tmp_path / "run"
    write_checkpoint(run, 10, seed=1)
    url = f"gs://{BUCKET}/run"
    upload(gcs, run, url)
    key = f"{BUCKET}/run/checkpoint-10/model.safetensors"
    listed = str(gcs.info(key)["generation"])
    mirrors = Mirrors()
    try:
        root = mirrors.sync(object_url(url))
        confine = ObjectConfinement.around(Confinement.to([]), mirrors, None)
        shard = root / "checkpoint-10" / "model.safetensors"
        original = (run / "checkpoint-10" / "model.safetensors").read_bytes()
        with confine.open(shard) as handle:
            assert handle.read(8) == original[:8]  # the listed generation's bytes
            assert generations and set(generations) == {listed}
            write_checkpoint(tmp_path / "other", 10, seed=2)  # same size, other bytes
            gcs.pipe_file(
                key, (tmp_path / "other" / "checkpoint-10" / "model.safetensors").read_bytes()
            )
            assert str(gcs.info(key)["generation"]) != listed
            with pytest.raises(FileNotFoundError, match="replaced while being read"):
                handle.read(8)
    finally:
        mirrors.close()
