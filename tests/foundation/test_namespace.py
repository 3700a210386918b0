"""Code imports the installed namespace (``alphawatch.service``, ...), never the bare folders.

The repository keeps ``service/``, ``workers/`` and ``dashboard/`` at its top for readers; an
import of the bare name works only in a clone and would load every module twice (two SQLAlchemy
metadata objects, two caches), so it is refused here rather than found in production.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BARE = {"service", "workers", "dashboard"}
# alphawatch/ itself only at its top: its service/, workers/, ... are symlinks to the folders below.
SOURCES = sorted(
    [
        *(ROOT / "alphawatch").glob("*.py"),
        *(
            p
            for folder in ("service", "workers", "dashboard", "alembic", "tests", "bench")
            for p in (ROOT / folder).rglob("*.py")
        ),
    ]
)


def _bare_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in BARE
        ]
    return found


def test_no_bare_top_level_imports() -> None:
    assert any(p.name == "watcher.py" for p in SOURCES)
    found = [hit for path in SOURCES for hit in _bare_imports(path)]
    assert found == [], "import alphawatch.<package> instead:\n" + "\n".join(found)


def test_the_check_sees_a_bare_import(tmp_path: Path) -> None:
    probe = ROOT / "tests" / "foundation" / "_bare_probe.py"
    probe.write_text("from service.db import models\n")
    try:
        assert _bare_imports(probe) == ["tests/foundation/_bare_probe.py:1: service.db"]
    finally:
        probe.unlink()
