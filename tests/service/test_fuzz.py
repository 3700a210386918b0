"""The OpenAPI schema fuzzed by schemathesis with every check, against a live server.

Every answer must be documented (status code, content type, body schema), valid requests must
be accepted and invalid ones refused with a 4xx, nothing may give a 5xx, and authentication
must not be ignored. Runs the ``schemathesis`` command line as a CI job would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from alphawatch.service.api import create_app
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from tests.factories import random_run
from tests.live import serve

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def _run(base: str, token: str, workdir: Path, *options: str) -> str:
    result = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--workers",
            "1",
            "--max-examples",
            "15",
            "--suppress-health-check",
            "all",
            "--seed",
            "1",
            "-H",
            f"Authorization: Bearer {token}",
            *options,
        ],
        # Its crash cache goes to the working directory: not into the repository.
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
        cwd=workdir,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "passed" in output and "failures" not in output.split("SUMMARY")[-1], output[-3000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("reads_need_token", [False, True])
def test_schemathesis_all_checks_pass(pg_url: str, tmp_path: Path, reads_need_token: bool) -> None:
    random_run(pg_url)
    with session_scope(make_engine(pg_url)) as session:
        token = create_token(session, name="fuzz", scope=TokenScope.ADMIN)
    # Generated paths fall outside this root (403); a path under it that does not exist would be
    # a 422 the schema cannot foresee. Registering runs is tested in test_api_live.py.
    app = create_app(
        Settings(
            database_url=pg_url,
            allowed_roots=[tmp_path],
            read_requires_token=reads_need_token,
            # The gate's wait_s goes up to 60 s: a generated step still to come would wait it.
            gate_wait_max_s=0.2,
        )
    )
    with serve(app) as base:
        # Reads over the filled run first; then everything, deletes and stateful links included.
        _run(
            base,
            token,
            tmp_path,
            "--exclude-method",
            "DELETE",
            "--phases",
            "examples,coverage,fuzzing",
        )
        _run(base, token, tmp_path)
    assert sum(len(ops) for ops in app.openapi()["paths"].values()) >= 17
