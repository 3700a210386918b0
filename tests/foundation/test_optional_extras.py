"""pytest starts, and collects every test, with only the core and the test tools installed.

The optional extras (crosscheck, integrations, the browser, PyYAML) are skipped where a test
needs them; nothing that runs at start-up or collection may import one.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Top-level modules that only the optional extras and the dev tools bring.
EXTRAS = frozenset(
    {
        "weightwatcher",
        "powerlaw",
        "transformers",
        "lightning",
        "mlflow",
        "wandb",
        "tensorboard",
        "playwright",
        "peft",
        "yaml",
        "schemathesis",
        # the cloud extra (s3fs, gcsfs) and the S3 API the object-store tests run against
        "s3fs",
        "gcsfs",
        "moto",
        "boto3",
        "aiobotocore",
    }
)


def _skipped(node: ast.stmt) -> str | None:
    """The module a top-level ``pytest.importorskip("...")`` statement asks for, if it is one."""
    value = node.value if isinstance(node, ast.Expr | ast.Assign) else None
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "importorskip"
        and value.args
        and isinstance(value.args[0], ast.Constant)
    ):
        return str(value.args[0].value).partition(".")[0]
    return None


def _unguarded_imports(path: Path) -> list[str]:
    skipped: set[str] = set()
    found = []
    for node in ast.parse(path.read_text()).body:
        if (name := _skipped(node)) is not None:
            skipped.add(name)
        modules = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
            for module in modules
            if module.partition(".")[0] in EXTRAS - skipped
        ]
    return found


def test_no_test_module_imports_an_extra_before_skipping_without_it() -> None:
    found = [
        line for path in sorted((ROOT / "tests").rglob("*.py")) for line in _unguarded_imports(path)
    ]
    assert not found, (
        "collection fails without the optional extras: import these inside the tests that "
        "need them, after `pytest.importorskip(...)`, or skip the module first:\n"
        + "\n".join(found)
    )


def test_warning_filters_name_no_class_of_an_extra() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    filters = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    # action:message:category:module:line; a dotted category is imported when pytest starts.
    dotted = [f for f in filters if "." in (f.split(":") + [""] * 3)[2]]
    assert not dotted, (
        "pytest imports a filter's warning class at start-up and stops when that fails: "
        f"add these in tests/conftest.py where the package is installed: {dotted}"
    )
