"""The OpenAPI schema fuzzed with schemathesis: no generated request gives a 5xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from tests.service.test_api import fill


def test_schema_fuzz_gives_no_server_error(pg_url: str, tmp_path: Path) -> None:
    fill(pg_url)
    (tmp_path / "root").mkdir()
    app = create_app(Settings(database_url=pg_url, allowed_roots=[tmp_path / "root"]))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case: Any) -> None:
            response = case.call()
            assert response.status_code < 500, (case.method, case.formatted_path, case.query,
                                                response.text)
            if response.status_code >= 400 and "json" in response.headers.get(
                    "content-type", ""):
                assert isinstance(response.json().get("detail"), str), response.text

        no_server_error()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert len(checked) >= 14, checked
