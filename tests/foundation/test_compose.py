"""docker-compose.yml cannot run here (no Docker engine); it must agree with settings and CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from alphawatch.cli import build_parser
from alphawatch.service.api.hosts import allowed_hosts
from alphawatch.settings import Settings

# PyYAML comes with the dev extra only; without it this module is skipped, not an error.
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_start_order(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker"}
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert "pgdata" in compose["volumes"]


def test_worker_has_a_gpu_and_a_read_only_checkpoint_root(compose: dict) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert any(v.endswith(":/runs:ro") for v in worker["volumes"])
    # Scaling with --scale worker=N needs no fixed container name or host port.
    assert "container_name" not in worker and "ports" not in worker


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_commands_parse_with_the_cli(compose: dict, service: str) -> None:
    command = compose["services"][service]["command"]
    argv = command if isinstance(command, list) else shlex.split(command)
    assert argv[0] == "alphawatch"
    build_parser().parse_args(argv[1:])  # raises SystemExit on an unknown option


@pytest.mark.parametrize("service", ["migrate", "api", "worker"])
def test_environment_names_real_settings(
    compose: dict, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"][service]["environment"]
    fields = {name.upper() for name in Settings.model_fields}
    for key, value in env.items():
        assert key.startswith("ALPHAWATCH_"), key
        assert key.removeprefix("ALPHAWATCH_").split("__")[0] in fields, f"{key} is no setting"
        password = "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
        # ${NAME:-default}: what compose substitutes when the operator sets nothing.
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value).replace(password, "pw"))
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.database_url.startswith("postgresql+psycopg://alphawatch:pw@postgres:5432/")
    assert settings.allowed_roots == [Path("/runs")]
    if service == "api":
        # The healthcheck, the published port and the other containers are answered.
        hosts = allowed_hosts(settings.allowed_hosts, "0.0.0.0")
        assert hosts is not None
        for host in ("127.0.0.1:8000", "localhost:8000", "api:8000"):
            assert hosts.allows(host), host
        assert not hosts.allows("rebound.example:8000")


def test_api_healthcheck_path_exists(compose: dict, sqlite_url: str) -> None:
    from fastapi.testclient import TestClient

    from alphawatch.service.api import create_app

    test = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    path = test.split("http://127.0.0.1:8000")[1].split("'")[0]
    with TestClient(create_app(Settings(database_url=sqlite_url))) as client:
        assert client.get(path).status_code == 200


def test_image_installs_the_wheel_with_every_package_folder() -> None:
    # The image is what users run: an editable tree there would hide a wheel that cannot migrate.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip wheel" in dockerfile and "alphawatch-*.whl" in dockerfile
    assert "install -e" not in dockerfile and "pip install -e" not in dockerfile
    copied = {
        line.split()[1]
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from" not in line
    }
    for folder in ("alphawatch", "service", "workers", "dashboard", "alembic", "pyproject.toml"):
        assert folder in copied, f"the wheel stage does not copy {folder}"
    links = {p.name: p.readlink() for p in (ROOT / "alphawatch").iterdir() if p.is_symlink()}
    assert links == {
        "service": Path("../service"),
        "workers": Path("../workers"),
        "dashboard": Path("../dashboard"),
        "migrations": Path("../alembic"),
    }
