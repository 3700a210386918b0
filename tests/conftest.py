"""Shared fixtures: real PostgreSQL (template-cloned per test), SQLite, a real tiny training run."""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import pg

# The bucket fixtures (s3, bucket) of the object-store tests; moto is imported only when used.
pytest_plugins = ["tests.objectstore"]

_counter = itertools.count()


# Fixtures that train a real model: a test that takes one, directly or through another
# fixture, trains.
TRAINING_FIXTURES = frozenset({"tiny_run", "small_run"})
# Functions that train a real model when called; a test or fixture that calls one trains.
TRAINERS = frozenset(
    {
        ("alphawatch.workers.demo_run", "train"),
        ("tests.checkpoints.training", "trainer_run"),
        ("tests.checkpoints.training", "nested_run"),
        ("tests.checkpoints.training", "lightning_run"),
    }
)
# Every test of the training-loop callbacks drives a real Trainer or Lightning loop.
TRAINING_FOLDERS = (Path(__file__).parent / "integrations",)


def _calls_a_trainer(function: object) -> bool:
    code = getattr(function, "__code__", None)
    scope = getattr(function, "__globals__", {})
    if code is None:
        return False
    for name in code.co_names:
        target = scope.get(name)
        if (getattr(target, "__module__", None), getattr(target, "__name__", None)) in TRAINERS:
            return True
    return False


def _trains(item: pytest.Item) -> bool:
    if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    if any(folder in item.path.parents for folder in TRAINING_FOLDERS):
        return True
    if _calls_a_trainer(getattr(item, "function", None)):
        return True
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(_calls_a_trainer(d.func) for defs in fixtures.values() for d in defs)


def pytest_configure(config: pytest.Config) -> None:
    # A filter that names a warning class imports its module, and pytest refuses to start when
    # that fails: Lightning's is added only where the optional extra is installed.
    if importlib.util.find_spec("lightning") is not None:
        config.addinivalue_line(
            "filterwarnings", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `make quick` leaves out -m trains: found here, so no test has to remember the marker.
    for item in items:
        if item.get_closest_marker("trains") is None and _trains(item):
            item.add_marker(pytest.mark.trains)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _pg_server() -> Iterator[tuple[str, pg.Cluster | None]]:
    admin_url, cluster = pg.find_server()
    yield admin_url, cluster
    if cluster is not None:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg_admin_url(_pg_server: tuple[str, pg.Cluster | None]) -> str:
    """URL of the maintenance database of the test server (to create extra databases)."""
    return _pg_server[0]


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    """Name of a database migrated to head once per session; tests clone it."""
    from alphawatch.service.db.migrations import upgrade

    name = f"aw_template_{os.getpid()}"
    pg.drop_database(pg_admin_url, name)
    url = pg.create_database(pg_admin_url, name)
    upgrade(url)
    _dispose_engines()
    yield name
    pg.drop_database(pg_admin_url, name)


def _dispose_engines() -> None:
    # CREATE DATABASE ... TEMPLATE needs the template to have no open connections.
    try:
        from alphawatch.service.db import session as db_session
    except ImportError:
        return
    dispose = getattr(db_session, "dispose_all", None)
    if callable(dispose):
        dispose()


@pytest.fixture
def pg_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """A fresh migrated PostgreSQL database for this test, dropped after it."""
    name = f"aw_test_{os.getpid()}_{next(_counter)}"
    url = pg.create_database(pg_admin_url, name, template=pg_template)
    yield url
    _dispose_engines()
    pg.drop_database(pg_admin_url, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh migrated SQLite database file for this test."""
    from alphawatch.service.db.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'alphawatch.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs once on PostgreSQL and once on SQLite."""
    name = "pg_url" if request.param == "postgres" else "sqlite_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def throwaway_cluster() -> Iterator[Callable[[], pg.Cluster]]:
    """Factory of private, migrated PostgreSQL clusters that a test may stop and start."""
    from alphawatch.service.db.migrations import upgrade

    made: list[pg.Cluster] = []

    def make() -> pg.Cluster:
        cluster = pg.new_cluster()
        made.append(cluster)
        pg.create_database(cluster.admin_url, "alphawatch")
        cluster_url = pg.sqlalchemy_url(cluster.admin_url, "alphawatch")
        upgrade(cluster_url)
        cluster.url = cluster_url
        return cluster

    yield make
    _dispose_engines()
    for cluster in made:
        cluster.destroy()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny training run (HF Trainer-style checkpoint-<step>/ folders), made once."""
    from alphawatch.workers.demo_run import train

    out = tmp_path_factory.mktemp("tiny-run")
    train(out, steps=30, save_every=10, seed=0)
    return out
