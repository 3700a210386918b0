"""The dashboard's files: served as JavaScript modules, shipped in the wheel, holding no copy of
the API's vocabulary."""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alphawatch.dashboard import STATIC_DIR
from alphawatch.service.api import create_app
from alphawatch.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VENDOR = STATIC_DIR / "vendor"
# The dashboard's own modules; vendor/ holds third-party scripts, loaded as classic scripts.
MODULES = sorted(
    p.relative_to(STATIC_DIR).as_posix()
    for p in STATIC_DIR.rglob("*.js")
    if not p.is_relative_to(VENDOR)
)
# Layout objects have a `type` too: axes (linear, log, date, category, multicategory) and shapes
# (line, rect, circle, path). Any other `type: "..."` in a view is a trace type.
LAYOUT_TYPES = {
    "linear",
    "log",
    "date",
    "category",
    "multicategory",
    "line",
    "rect",
    "circle",
    "path",
}


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=sqlite_url))) as c:
        yield c


def test_the_page_is_modules_one_per_view() -> None:
    assert "main.js" in MODULES and "api.js" in MODULES and "state.js" in MODULES
    assert len([m for m in MODULES if m.startswith("views/")]) >= 8
    page = (STATIC_DIR / "index.html").read_text()
    assert '<script type="module" src="/static/main.js"></script>' in page
    # No module grows back into the one 784-line script it replaced.
    assert max(len((STATIC_DIR / m).read_text().splitlines()) for m in MODULES) < 250


@pytest.mark.parametrize("module", MODULES)
def test_every_module_is_served_as_javascript(client: TestClient, module: str) -> None:
    response = client.get(f"/static/{module}")
    assert response.status_code == 200
    # Browsers refuse a module script sent with any other type.
    assert response.headers["content-type"].split(";")[0] == "text/javascript"


def test_the_page_preloads_every_module_and_only_preloads_plotly() -> None:
    # The module graph in one round of requests, not one per level of imports; Plotly is
    # fetched at once and evaluated by ui.js once the first answers are asked for.
    page = (STATIC_DIR / "index.html").read_text()
    preloaded = re.findall(r'<link rel="modulepreload" href="/static/([^"]+)">', page)
    assert sorted(preloaded) == sorted(m for m in MODULES if m != "main.js")
    assert '<link rel="preload" href="/static/vendor/plotly.min.js" as="script">' in page
    assert "<script src=" not in page


def test_every_module_import_resolves_to_a_served_file() -> None:
    for module in MODULES:
        source = (STATIC_DIR / module).read_text()
        for target in re.findall(r'^import .* from "([^"]+)";$', source, flags=re.M):
            resolved = (STATIC_DIR / module).parent / target
            assert resolved.resolve().is_file(), f"{module} imports missing {target}"


def test_the_wheel_ships_every_static_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["alphawatch.dashboard"]
    for path in STATIC_DIR.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            relative = path.relative_to(STATIC_DIR.parent).as_posix()
            # setuptools globs do not cross folders: static/* does not ship static/views/x.js.
            assert any(
                fnmatch(relative, g) and relative.count("/") == g.count("/") for g in globs
            ), f"{relative} would be missing from the wheel"


def test_no_module_copies_a_statistic_kind_or_method_name(client: TestClient) -> None:
    words = client.get("/api/v1/vocabulary").json()
    names = (
        [s["name"] for s in words["statistics"]]
        + words["kinds"]
        + [m["name"] for m in words["fit_methods"]]
    )
    alternatives = "|".join(map(re.escape, names))
    literal = re.compile(rf"""["'`]({alternatives})["'`]""")
    for module in MODULES:
        found = literal.findall((STATIC_DIR / module).read_text())
        assert not found, f"{module} declares {found} itself; take them from /api/v1/vocabulary"


def _bundled_trace_types() -> set[str]:
    # Each trace module of a plotly.js bundle registers itself as {moduleType:"trace",name:"…"}.
    source = (VENDOR / "plotly.min.js").read_text()
    return set(re.findall(r'moduleType:"trace",name:"(\w+)"', source))


def test_the_vendored_plotly_has_every_trace_type_the_views_draw() -> None:
    bundled = _bundled_trace_types()
    # A bundle whose registrations this pattern no longer finds must fail here, not pass empty.
    assert {"scatter", "heatmap"} <= bundled, bundled
    used = {"scatter"}  # the type of a trace that names none
    for module in MODULES:
        source = (STATIC_DIR / module).read_text()
        used |= set(re.findall(r"""\btype: ["'`](\w+)["'`]""", source)) - LAYOUT_TYPES
    # A trace type missing from the bundle draws nothing, silently: vendor a bundle that has it.
    assert used <= bundled, f"views draw {sorted(used - bundled)}, not in vendor/plotly.min.js"
    assert {"bar", "histogram", "heatmap"} <= used, used


def test_the_vendored_plotly_is_the_file_its_readme_describes() -> None:
    readme = (VENDOR / "README.md").read_text()
    recorded = re.search(r"`plotly.min.js` sha256 \| `([0-9a-f]{64})`", readme)
    assert recorded, "vendor/README.md must record the sha256 of plotly.min.js"
    actual = hashlib.sha256((VENDOR / "plotly.min.js").read_bytes()).hexdigest()
    assert actual == recorded[1], "plotly.min.js changed: remake it as vendor/README.md says"
    assert (VENDOR / "LICENSE").read_text().startswith("MIT License")


def test_plotly_is_served_from_the_package_as_javascript(client: TestClient) -> None:
    response = client.get("/static/vendor/plotly.min.js")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "text/javascript"
    assert response.content == (VENDOR / "plotly.min.js").read_bytes()
