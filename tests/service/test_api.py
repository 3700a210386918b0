"""The REST API on hand-made runs: trend numbers, gate verdicts, errors, auth, path safety."""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alphawatch.service.api import create_app, queries
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from tests.factories import KINDS, STEPS, random_run


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    (tmp_path / "root" / "ok-run").mkdir(parents=True)
    settings = Settings(database_url=db_url, allowed_roots=[tmp_path / "root"])
    with TestClient(create_app(settings)) as c:
        yield c


def _expected(layers: list[dict[str, object]], stat: str, flt: str) -> float | None:
    values = [
        float(x["alpha"])
        for x in layers  # type: ignore[arg-type]
        if float(x["alpha"]) <= 8.0  # type: ignore[arg-type]
        and (flt == "all" or (x["fit_status"] == "ok" and not x["correlation_trap"]))
    ]
    if not values:
        return None
    v = np.asarray(values)
    if stat == "median":
        return float(np.median(v))
    if stat == "mean":
        return float(v.mean())
    if stat == "trimmed_mean":
        s = np.sort(v)
        cut = int(0.1 * s.size)
        return float(s[cut : s.size - cut].mean())
    return float(np.percentile(v, int(stat[1:])))


@pytest.mark.parametrize("stat", ["median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90"])
@pytest.mark.parametrize("flt", ["trusted", "all"])
def test_trend_equals_direct_computation(pg_url: str, tmp_path: Path, stat: str, flt: str) -> None:
    written = random_run(pg_url)
    with TestClient(create_app(Settings(database_url=pg_url))) as c:
        body = c.get("/api/v1/runs/1/trend", params={"stat": stat, "filter": flt}).json()
    assert [p["step"] for p in body["points"]] == list(STEPS)
    for point in body["points"]:
        layers = written[point["step"]]
        assert point["value"] == pytest.approx(_expected(layers, stat, flt), rel=1e-12)
        assert point["n_used"] + point["n_excluded"] == len(layers)
        over = sum(1 for x in layers if float(x["alpha"]) > 8.0)  # type: ignore[arg-type]
        assert point["excluded"].get("alpha_gt_8", 0) == over


def test_trend_by_kind_and_blocks(pg_url: str) -> None:
    written = random_run(pg_url)
    with TestClient(create_app(Settings(database_url=pg_url))) as c:
        body = c.get(
            "/api/v1/runs/1/trend",
            params={"filter": "all", "kind": "q,k", "block_min": 1, "block_max": 2},
        ).json()
    for point in body["points"]:
        chosen = [
            x
            for x in written[point["step"]]
            if x["kind"] in ("q", "k") and 1 <= int(x["block"]) <= 2
        ]  # type: ignore[call-overload]
        assert point["value"] == pytest.approx(_expected(chosen, "median", "all"))


def test_gate_passes_and_fails_exactly_at_thresholds(client: TestClient, db_url: str) -> None:
    random_run(db_url)
    base = client.get("/api/v1/runs/1/gate", params={"min_alpha": 0, "max_alpha": 100}).json()
    assert base["passed"] and base["step"] == 300
    value, share = base["value"], base["untrusted_share"]
    at = client.get("/api/v1/runs/1/gate", params={"max_alpha": value, "min_alpha": value}).json()
    assert at["passed"]
    below = client.get("/api/v1/runs/1/gate", params={"max_alpha": value - 1e-9}).json()
    assert not below["passed"]
    assert [v["rule"] for v in below["violations"]] == ["max_alpha"]
    assert not client.get(
        "/api/v1/runs/1/gate",
        params={"min_alpha": 0, "max_alpha": 100, "max_untrusted_share": share - 1e-9},
    ).json()["passed"]
    ref = client.get(
        "/api/v1/runs/1/gate",
        params={"min_alpha": 0, "max_alpha": 100, "ref_step": 100, "max_delta": 0},
    ).json()
    assert ref["delta"] is not None
    assert ref["passed"] == (ref["delta"] == 0)
    strict = client.get("/api/v1/runs/1/gate", params={"max_alpha": 0.1, "strict": True})
    assert strict.status_code == 409
    assert (
        client.get("/api/v1/runs/1/gate", params={"step": 150}).json()["violations"][0]["rule"]
        == "no_data"
    )


def test_a_rounded_heatmap_keeps_its_empty_cells() -> None:
    nan = float("nan")
    z = np.array([[1.23456, nan, -0.0004], [nan, nan, 7.0], [2.5e-7, 6.2764, float("inf")]])
    assert np.array_equal(
        queries._rounded(z, 3),
        [[1.235, nan, -0.0], [nan, nan, 7.0], [0.0, 6.276, float("inf")]],
        equal_nan=True,
    )
    # A value too large to scale by 10**digits is kept as it is (it has no decimals).
    assert queries._rounded(np.array([[1e300, -(2.0**1000), 1e300 / 3]]), 15).tolist() == [
        [1e300, -(2.0**1000), 1e300 / 3]
    ]
    values = np.random.default_rng(0).uniform(-10, 10, (50, 40))
    rounded = queries._rounded(values, 3)
    # Within half of the last decimal kept (a tie may go either way), and as short as printed.
    assert np.abs(rounded - values).max() <= 0.5e-3 + 1e-12
    assert all(len(repr(v).split(".")[1]) <= 3 for v in rounded.ravel().tolist())


def test_layers_history_esd_heatmap_flags_csv(client: TestClient, db_url: str) -> None:
    written = random_run(db_url)
    layers = client.get("/api/v1/runs/1/checkpoints/200/layers").json()["layers"]
    assert len(layers) == len(written[200])
    name = "model.layers.2.v_proj"
    history = client.get(f"/api/v1/runs/1/layers/{name}/history").json()
    assert [p["step"] for p in history["points"]] == list(STEPS)
    esd = client.get(f"/api/v1/runs/1/checkpoints/300/layers/{name}/esd").json()
    assert len(esd["evals"]) == 64 and esd["fit_line"]["x"]
    heat = client.get("/api/v1/runs/1/heatmap").json()
    assert heat["steps"] == list(STEPS) and len(heat["z"]) == len(heat["layers"]) == 28
    assert heat["layers"][0].startswith("model.layers.0.")
    for step in STEPS:
        cell = (heat["layers"].index(name), heat["steps"].index(step))
        row = next(x for x in written[step] if x["name"] == name)
        assert heat["z"][cell[0]][cell[1]] == pytest.approx(row["alpha"])
        assert heat["trusted"][cell[0]][cell[1]] == (
            row["fit_status"] == "ok" and not row["correlation_trap"]
        )
    # digits: the same matrix rounded, the cells without a value still null.
    rounded = client.get("/api/v1/runs/1/heatmap", params={"digits": 3}).json()
    assert rounded["z"] == [[None if v is None else round(v, 3) for v in r] for r in heat["z"]]
    assert rounded["trusted"] == heat["trusted"] and rounded["layers"] == heat["layers"]
    flags = client.get("/api/v1/runs/1/flags").json()["points"]
    assert [f["step"] for f in flags] == list(STEPS)
    for point in flags:
        rows = written[point["step"]]
        assert point["n_layers"] == len(rows)
        assert point["correlation_trap"] == sum(bool(x["correlation_trap"]) for x in rows)
        assert point["rank_collapse"] == 0
        for status in ("ok", "poor_fit", "unstable", "failed"):
            assert point[status] == sum(x["fit_status"] == status for x in rows)
    csv_text = client.get("/api/v1/runs/1/layers.csv").text
    assert csv_text.count("\n") == 1 + 3 * 28
    downsampled = client.get("/api/v1/runs/1/trend", params={"max_points": 2}).json()
    assert [p["step"] for p in downsampled["points"]] == [100, 300]
    compare = client.get("/api/v1/compare", params={"runs": "1"}).json()
    assert len(compare["runs"][0]["points"]) == 3
    assert "alphawatch_checkpoints" in client.get("/metrics").text


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/v1/runs/abc", 422),
        ("/api/v1/runs/999", 404),
        ("/api/v1/runs/1/trend?stat=max", 422),
        ("/api/v1/runs/1/trend?metric=drop_table", 422),
        ("/api/v1/runs/1/trend?filter=x", 422),
        ("/api/v1/runs/1/checkpoints/12345/layers", 404),
        ("/api/v1/runs/1/gate?max_untrusted_share=2", 422),
        ("/api/v1/runs/1/layers/nope/history", 404),
        ("/api/v1/compare?runs=1;2", 422),
        ("/api/v1/runs/1/checkpoints/100/layers/nope/esd", 404),
    ],
)
def test_bad_requests_get_4xx_with_a_message(
    client: TestClient, db_url: str, path: str, code: int
) -> None:
    random_run(db_url)
    response = client.get(path)
    assert response.status_code == code
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail


def test_writes_need_a_token_and_paths_stay_in_the_root(
    client: TestClient, db_url: str, tmp_path: Path
) -> None:
    body = {"name": "new-run", "path": str(tmp_path / "root" / "ok-run")}
    assert client.post("/api/v1/runs", json=body).status_code == 401
    assert (
        client.post("/api/v1/runs", json=body, headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    with session_scope(make_engine(db_url)) as session:
        token = create_token(session, name="ci")
        admin = create_token(session, name="ops", scope=TokenScope.ADMIN)
    auth = {"Authorization": f"Bearer {token}"}
    created = client.post("/api/v1/runs", json=body, headers=auth)
    assert created.status_code == 201 and created.json()["name"] == "new-run"
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "escape").symlink_to(tmp_path / "outside")
    for bad, code in (
        (str(tmp_path / "root" / ".." / "outside"), 403),
        (str(tmp_path / "root" / "escape"), 403),
        ("relative/path", 422),
        ("/etc", 403),
        (str(tmp_path / "root" / "missing"), 422),
    ):
        response = client.post("/api/v1/runs", json={"name": "bad", "path": bad}, headers=auth)
        assert response.status_code == code, (bad, response.text)
        assert response.json()["detail"]
    run = f"/api/v1/runs/{created.json()['id']}"
    assert client.delete(run).status_code == 401
    refused = client.delete(run, headers=auth)  # a write token may register, not delete
    assert refused.status_code == 403 and "'admin'" in refused.json()["detail"]
    assert client.delete(run, headers={"Authorization": f"Bearer {admin}"}).status_code == 204


def test_reads_can_require_a_token(db_url: str) -> None:
    with TestClient(create_app(Settings(database_url=db_url, read_requires_token=True))) as c:
        assert c.get("/api/v1/runs").status_code == 401


_text = st.text(alphabet=string.printable, max_size=12)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(run=_text, metric=_text, stat=_text, flt=_text, kind=_text, step=_text, mp=_text)
def test_fuzzed_queries_never_give_5xx(
    client: TestClient, run: str, metric: str, stat: str, flt: str, kind: str, step: str, mp: str
) -> None:
    run, step = quote(run, safe=""), quote(step, safe="")
    params = {"metric": metric, "stat": stat, "filter": flt, "kind": kind, "max_points": mp}
    for path in (
        f"/api/v1/runs/{run}/trend",
        f"/api/v1/runs/{run}/gate",
        f"/api/v1/runs/1/checkpoints/{step}/layers",
        f"/api/v1/runs/1/layers/{run}/history",
        "/api/v1/compare",
    ):
        response = client.get(path, params=params)
        assert response.status_code < 500, (path, params, response.text)


def _mad_kept(values: list[float], k: float = 3.0) -> list[float]:
    v = np.asarray(values)
    if v.size < 3:
        return values
    median = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - median))
    return values if mad == 0 else [x for x in values if abs(x - median) <= k * mad]


@pytest.mark.parametrize("outliers", ["none", "mad"])
def test_kept_statistics_equal_the_layer_rows(db_url: str, outliers: str) -> None:
    """Trend points read from checkpoint_stat equal those computed from layer rows and numpy."""
    from alphawatch.service.db.models import CheckpointStat

    written = random_run(db_url)
    app = create_app(Settings(database_url=db_url))
    stats = ["median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90", "iqr"]
    with TestClient(app) as c:

        def all_points() -> dict[tuple[str, str], list[dict[str, object]]]:
            return {
                (stat, flt): c.get(
                    "/api/v1/runs/1/trend",
                    params={"stat": stat, "filter": flt, "outliers": outliers},
                ).json()["points"]
                for stat in stats
                for flt in ("trusted", "all")
            }

        def group_points() -> list[object]:
            return [
                c.get(
                    "/api/v1/runs/1/trend",
                    params={"kind": kinds, "filter": flt, "outliers": outliers, "stat": stat},
                ).json()
                for kinds in ("v,o,q,k,qkv", "gate,up,down,fc_in,fc_out", *KINDS)
                for flt in ("trusted", "all")
                for stat in ("median", "p90")
            ]

        kept, kept_groups = all_points(), group_points()
        with session_scope(make_engine(db_url)) as session:
            assert session.query(CheckpointStat).delete() > 0
        recomputed, recomputed_groups = all_points(), group_points()
    assert kept == recomputed
    assert kept_groups == recomputed_groups
    for (stat, flt), points in kept.items():
        for point in points:
            values = [
                float(x["alpha"])
                for x in written[int(point["step"])]  # type: ignore[call-overload,arg-type]
                if float(x["alpha"]) <= 8.0  # type: ignore[arg-type]
                and (flt == "all" or (x["fit_status"] == "ok" and not x["correlation_trap"]))
            ]
            if outliers == "mad":
                values = _mad_kept(values)
            v = np.asarray(values)
            want = (
                float(np.percentile(v, 75) - np.percentile(v, 25))
                if stat == "iqr"
                else _expected(
                    [{"alpha": x, "fit_status": "ok", "correlation_trap": False} for x in values],
                    stat,
                    "all",
                )
            )
            assert point["value"] == pytest.approx(want, rel=1e-12), (stat, flt)
            assert point["n_used"] == len(values)


def test_single_kind_trends_are_kept_at_ingest_and_read_from_there(db_url: str) -> None:
    """The run page asks alpha of each kind alone: written with the layer rows, served from them."""
    from sqlalchemy import func, select, update

    from alphawatch.service.db.models import CheckpointStat

    written = random_run(db_url)
    with session_scope(make_engine(db_url)) as session:
        kept = dict(
            session.execute(
                select(CheckpointStat.kinds, func.count())
                .where(CheckpointStat.kinds.in_(KINDS), CheckpointStat.metric == "alpha")
                .group_by(CheckpointStat.kinds)
            ).all()
        )
    # Every kind of every checkpoint, under each filter and outlier rule.
    assert kept == {kind: len(STEPS) * 2 * 2 for kind in KINDS}
    with TestClient(create_app(Settings(database_url=db_url))) as c:

        def points(kind: str, max_points: int = 150) -> list[dict[str, object]]:
            params = {"kind": kind, "max_points": max_points}
            got = c.get("/api/v1/runs/1/trend", params=params)
            assert got.status_code == 200, got.text
            return list(got.json()["points"])

        for kind in ("q", "down"):
            for point in points(kind):
                layers = [x for x in written[int(point["step"])] if x["kind"] == kind]  # type: ignore[call-overload]
                assert point["value"] == pytest.approx(_expected(layers, "median", "trusted"))
        # A kind the run lacks has no kept row and is answered, empty, from the layer rows.
        assert {p["n_used"] for p in points("lm_head")} == {0}
        # What the single-kind answers are read from: the kept rows.
        with session_scope(make_engine(db_url)) as session:
            session.execute(
                update(CheckpointStat).where(CheckpointStat.kinds == "q").values(median=-1.0)
            )
        # (Asked anew: an answer kept by the result cache may outlive the notification's trip.)
        assert {p["value"] for p in points("q", 149)} == {-1.0}
        assert -1.0 not in {p["value"] for p in points("k", 149)}


def test_layer_history_pages_and_downsamples(client: TestClient, db_url: str) -> None:
    written = random_run(db_url)
    name = "model.layers.1.q_proj"
    url = f"/api/v1/runs/1/layers/{name}/history"
    full = client.get(url).json()["points"]
    want = [
        next(float(x["alpha"]) for x in written[s] if x["name"] == name)  # type: ignore[arg-type]
        for s in STEPS
    ]
    assert [p["value"] for p in full] == pytest.approx(want)
    assert [
        p["step"] for p in client.get(url, params={"limit": 1, "offset": 1}).json()["points"]
    ] == [200]
    assert [p["step"] for p in client.get(url, params={"max_points": 2}).json()["points"]] == [
        100,
        300,
    ]
    assert client.get(url, params={"metric": "D"}).json()["points"][0]["value"] == pytest.approx(
        next(x["D"] for x in written[100] if x["name"] == name)
    )


def test_layer_schema_is_written_out_and_covers_every_column() -> None:
    """LayerMetricRead is declared field by field (not generated), and must follow the table."""
    from alphawatch.service.api.schemas import LayerMetricRead
    from alphawatch.service.db.models import LAYER_COLUMNS

    assert set(LayerMetricRead.model_fields) == set(LAYER_COLUMNS), (
        "add the new layer_metric column to schemas.LayerMetricRead (or drop the old one)"
    )


@pytest.mark.parametrize("extra", [{}, {"max_points": "2", "from_step": "100", "to_step": "200"}])
def test_distances_send_the_matrices_asked_for_and_the_same_ranking(
    db_url: str, extra: dict[str, str]
) -> None:
    """matrices= leaves the other layer x step matrices out; everything else is unchanged."""
    from sqlalchemy import select, update

    from alphawatch.service.db.models import Checkpoint, LayerMetric

    random_run(db_url)
    random_run(db_url, name="run-b", seed=1)  # no distance stored anywhere
    with session_scope(make_engine(db_url)) as session:
        # Distances as the worker stores them, on the q and k rows of run-a's later steps.
        for step, before in ((200, 100), (300, 200)):
            session.execute(
                update(LayerMetric)
                .where(
                    LayerMetric.checkpoint_id
                    == select(Checkpoint.id)
                    .where(Checkpoint.run_id == 1, Checkpoint.step == step)
                    .scalar_subquery(),
                    LayerMetric.kind.in_(("q", "k")),
                )
                .values(
                    change_fro=LayerMetric.alpha / 10,
                    change_spectral=LayerMetric.alpha / 20,
                    subspace_overlap=1 / LayerMetric.alpha,
                    change_ref_step=before,
                )
            )
    with TestClient(create_app(Settings(database_url=db_url))) as c:

        def get(run: int, **params: str) -> dict[str, object]:
            got = c.get(f"/api/v1/runs/{run}/distances", params={"to_step": "300", **params})
            assert got.status_code == 200, got.text
            return dict(got.json())

        full = get(1, **extra)
        assert any(x is not None for row in full["change_fro"] for x in row)  # type: ignore[attr-defined]
        assert any(r["change_fro"] is not None for r in full["ranking"])  # type: ignore[attr-defined]
        every = ("change_fro", "change_spectral", "subspace_overlap", "ref_steps", "alpha")
        for asked in ("change_fro", "subspace_overlap,ref_steps", "alpha,change_spectral"):
            answer = get(1, **extra, matrices=asked)
            for matrix in every:
                assert answer[matrix] == (full[matrix] if matrix in asked else None), matrix
            rest = {k: v for k, v in full.items() if k not in every}
            assert {k: v for k, v in answer.items() if k not in every} == rest
        bare = get(2, matrices="change_fro")
        assert bare["change_fro"] == get(2)["change_fro"]
        assert all(x is None for row in bare["change_fro"] for x in row)  # type: ignore[attr-defined]
        assert len(bare["layers"]) == len(KINDS) * 4  # type: ignore[arg-type]
        for bad in ("fro", "alpha,", "change_fro;alpha"):
            response = c.get("/api/v1/runs/1/distances", params={"matrices": bad})
            assert response.status_code == 422, bad
