"""Stored gate rules: defaults from the settings, overrides by PUT, used by GET /gate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from tests.db import rows
from tests.factories import random_run

RULES = "/api/v1/runs/1/gate-rules"


def _token(url: str, name: str, scope: TokenScope) -> dict[str, str]:
    with session_scope(make_engine(url)) as session:
        return {"Authorization": f"Bearer {create_token(session, name=name, scope=scope)}"}


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    random_run(db_url)
    settings = Settings(
        database_url=db_url,
        gate={"max_untrusted_share": 0.9},
        alerts={"webhook_url": "http://127.0.0.1:9/never-called"},
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_defaults_come_from_the_settings(client: TestClient) -> None:
    body = client.get(RULES).json()
    # min/max alpha unset in the settings: the trust thresholds' over/under-trained labels.
    assert body["rules"] == {
        "stat": "median",
        "filter": "trusted",
        "min_alpha": 2.0,
        "max_alpha": 6.0,
        "max_untrusted_share": 0.9,
        "max_delta": None,
        "ref_step": None,
    }
    assert body["defaults"] == body["rules"] and body["overrides"] == {}
    assert body["updated_at"] is None and body["last_verdict"] is None
    assert client.get("/api/v1/runs/99/gate-rules").status_code == 404


def test_put_needs_a_write_token(client: TestClient, db_url: str) -> None:
    rule = {"max_alpha": 5.0}
    assert client.put(RULES, json=rule).status_code == 401
    read = client.put(RULES, json=rule, headers=_token(db_url, "r", TokenScope.READ))
    assert read.status_code == 403 and "detail" in read.json()
    assert client.get(RULES).json()["overrides"] == {}
    answer = client.put(RULES, json=rule, headers=_token(db_url, "w", TokenScope.WRITE))
    assert answer.status_code == 200
    assert answer.json()["overrides"] == rule and answer.json()["rules"]["max_alpha"] == 5.0
    assert client.get(RULES).json() == answer.json()


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        # Valid bodies whose band is empty once merged: a conflict, not a malformed request.
        ({"min_alpha": 4.0, "max_alpha": 3.0}, 409, "min_alpha 4 is above max_alpha 3"),
        ({"min_alpha": 7.0}, 409, "min_alpha 7 is above max_alpha 6"),  # against the server's max
        ({"stat": "iqr"}, 422, "stat"),
        ({"stat": None}, 422, "stat"),
        ({"max_untrusted_share": 1.5}, 422, "max_untrusted_share"),
        ({"max_delta": -1}, 422, "max_delta"),
        ({"ref_step": -5}, 422, "ref_step"),
        ({"ref_step": 119.5}, 422, "ref_step"),
        ({"ref_step": "119"}, 422, "ref_step"),
        ({"ref_step": True}, 422, "ref_step"),
        ({"max_alpha": "high"}, 422, "max_alpha"),
        ({"min_alfa": 2}, 422, "min_alfa"),
    ],
)
def test_nonsense_is_refused_with_a_reason(
    client: TestClient, db_url: str, body: dict[str, Any], code: int, words: str
) -> None:
    answer = client.put(RULES, json=body, headers=_token(db_url, "w", TokenScope.WRITE))
    assert answer.status_code == code, answer.text
    assert words in answer.json()["detail"]
    assert client.get(RULES).json()["overrides"] == {}  # nothing stored


def test_the_gate_uses_the_stored_rules_and_the_query_wins(client: TestClient, db_url: str) -> None:
    write = _token(db_url, "w", TokenScope.WRITE)
    base = client.get("/api/v1/runs/1/gate", params={"min_alpha": 0, "max_alpha": 100}).json()
    value = base["value"]
    stored = client.put(
        RULES, json={"max_alpha": value - 1e-6, "min_alpha": 1.0}, headers=write
    ).json()
    # The PUT recorded the run's verdict under its new rules.
    assert stored["last_verdict"]["passed"] is False and stored["last_verdict"]["step"] == 300
    failed = client.get("/api/v1/runs/1/gate").json()
    assert [v["rule"] for v in failed["violations"]] == ["max_alpha"]
    assert failed["violations"][0]["threshold"] == pytest.approx(value - 1e-6)
    assert client.get("/api/v1/runs/1/gate", params={"max_alpha": value}).json()["passed"]
    assert client.get("/api/v1/runs/1/gate", params={"strict": True}).status_code == 409
    # null switches a rule off for this run; a rule left out takes the server's default again.
    off = client.put(RULES, json={"max_alpha": None, "min_alpha": None}, headers=write).json()
    assert off["rules"]["max_alpha"] is None and off["rules"]["max_untrusted_share"] == 0.9
    assert client.get("/api/v1/runs/1/gate").json()["passed"]
    assert client.put(RULES, json={}, headers=write).json()["rules"] == off["defaults"]


def test_max_delta_without_a_reference_compares_with_the_checkpoint_before(
    client: TestClient, db_url: str
) -> None:
    write = _token(db_url, "w", TokenScope.WRITE)
    client.put(RULES, json={"min_alpha": None, "max_alpha": None, "max_delta": 0}, headers=write)
    verdict = client.get("/api/v1/runs/1/gate").json()
    assert verdict["ref_step"] == 200 and verdict["delta"] is not None
    assert verdict["passed"] == (verdict["delta"] == 0)
    at_first = client.get("/api/v1/runs/1/gate", params={"step": 100}).json()
    assert at_first["ref_step"] is None and at_first["passed"]  # nothing before it


def test_a_rule_change_that_flips_the_verdict_queues_an_alert(
    client: TestClient, db_url: str
) -> None:
    write = _token(db_url, "w", TokenScope.WRITE)
    client.put(RULES, json={"min_alpha": 0, "max_alpha": 100}, headers=write)  # first: passes
    assert rows(db_url, "SELECT count(*) FROM alert") == [(0,)]
    client.put(RULES, json={"min_alpha": 0, "max_alpha": 0.5}, headers=write)  # now fails
    client.put(RULES, json={"min_alpha": 0, "max_alpha": 0.6}, headers=write)  # still fails
    alerts = client.get("/api/v1/runs/1/alerts").json()["alerts"]
    assert [(a["verdict"], a["previous"], a["status"]) for a in alerts] == [
        ("fail", "pass", "pending")
    ]
    assert "is above 0.5" in alerts[0]["body"]["text"]


def test_an_integral_json_number_is_an_integer_step(client: TestClient, db_url: str) -> None:
    # JSON Schema counts 119.0 as an integer, so the schema admits it (and a fuzzer sends it).
    write = _token(db_url, "w", TokenScope.WRITE)
    answer = client.put(RULES, json={"ref_step": 119.0}, headers=write)
    assert answer.status_code == 200, answer.text
    assert answer.json()["overrides"] == {"ref_step": 119}
