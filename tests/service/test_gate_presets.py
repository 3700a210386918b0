"""Named gate rule presets: ``PUT /gate-rules {"preset": NAME}`` stores the rules it stands for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from alphawatch.gate_rules import PRESETS, RULE_NAMES, GateRules, preset_rules
from alphawatch.service.api import create_app
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from tests.factories import random_run

RULES = "/api/v1/runs/1/gate-rules"


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    random_run(db_url)
    with TestClient(create_app(Settings(database_url=db_url))) as c:
        yield c


@pytest.fixture
def write(db_url: str) -> dict[str, str]:
    with session_scope(make_engine(db_url)) as session:
        token = create_token(session, name="w", scope=TokenScope.WRITE)
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_names_every_rule_and_is_valid(name: str) -> None:
    # Self-contained: every rule is set (None: off), so the server's defaults do not leak in.
    rules = preset_rules(name)
    assert set(rules) == set(RULE_NAMES)
    GateRules.model_validate(rules)
    rules["stat"] = "changed"
    assert preset_rules(name)["stat"] != "changed"  # a copy, never the definition


def test_the_preset_expands_to_its_rules_and_the_gate_applies_them(
    client: TestClient, write: dict[str, str]
) -> None:
    answer = client.put(RULES, json={"preset": "early-warning"}, headers=write)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "preset" not in body["overrides"]
    assert body["overrides"] == PRESETS["early-warning"]
    assert body["rules"] == GateRules.model_validate(PRESETS["early-warning"]).model_dump(
        mode="json"
    )
    assert client.get(RULES).json()["rules"] == body["rules"]
    verdict = client.get("/api/v1/runs/1/gate").json()
    rules = body["rules"]
    value = verdict["value"]
    band_broken = (rules["min_alpha"] is not None and value < rules["min_alpha"]) or (
        rules["max_alpha"] is not None and value > rules["max_alpha"]
    )
    failed = {v["rule"] for v in verdict["violations"]}
    assert ({"min_alpha", "max_alpha"} & failed != set()) == band_broken


def test_rules_named_beside_a_preset_win(client: TestClient, write: dict[str, str]) -> None:
    body = {"preset": "early-warning", "max_delta": 0.01, "max_untrusted_share": None}
    stored = client.put(RULES, json=body, headers=write).json()
    assert stored["overrides"] == {
        **PRESETS["early-warning"],
        "max_delta": 0.01,
        "max_untrusted_share": None,
    }


@pytest.mark.parametrize(
    ("preset", "words"),
    [
        ("early_warning", "unknown gate rule preset 'early_warning'; known presets: early-warning"),
        ("", "unknown gate rule preset ''"),
        (3, "preset"),
        (None, "preset must name a preset: early-warning"),
    ],
)
def test_an_unknown_preset_is_refused_and_nothing_is_stored(
    client: TestClient, write: dict[str, str], preset: object, words: str
) -> None:
    answer = client.put(RULES, json={"preset": preset}, headers=write)
    assert answer.status_code == 422, answer.text
    assert words in answer.json()["detail"]
    assert client.get(RULES).json()["overrides"] == {}


def test_the_schema_lists_the_presets(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GateRulesWrite"]
    assert schema["properties"]["preset"]["enum"] == sorted(PRESETS)
