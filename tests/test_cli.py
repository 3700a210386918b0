"""The command line as a user runs it: analyze formats, gate exit codes, clear errors."""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from alphawatch.cli import build_parser, main
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.live import serve

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alphawatch", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )


def test_help_explains_how_to_start() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    assert "alphawatch up" in result.stdout and "analyze" in result.stdout


def test_analyze_json_csv_table_agree(tiny_run: Path) -> None:
    ckpt = tiny_run / "checkpoint-20"
    as_json = _cli("analyze", str(ckpt), "--format", "json", "--device", "cpu")
    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["step"] == 20
    names = [layer["name"] for layer in doc["layers"]]
    assert "model.layers.0.self_attn.q_proj" in names
    for layer in doc["layers"]:
        assert {
            "name",
            "shape",
            "alpha",
            "D",
            "xmin",
            "num_pl_spikes",
            "fit_status",
            "trusted",
        } <= set(layer)
    assert "summary" in doc

    as_csv = _cli("analyze", str(ckpt), "--format", "csv", "--device", "cpu")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["name"] for r in rows] == names
    for row, layer in zip(rows, doc["layers"], strict=True):
        if layer["alpha"] is not None:
            assert float(row["alpha"]) == pytest.approx(layer["alpha"], rel=1e-9)

    table = _cli("analyze", str(ckpt), "--device", "cpu")
    assert table.returncode == 0
    assert all(name in table.stdout for name in names)


def test_analyze_missing_path_exits_2(tmp_path: Path) -> None:
    result = _cli("analyze", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


@pytest.fixture
def live_api(tiny_run: Path, pg_url: str) -> Iterator[str]:
    settings = Settings(database_url=pg_url, device="cpu", settle_s=0.0)
    Watcher(settings, [tiny_run]).run_once()
    with serve(create_app(settings)) as url:
        yield url


def test_gate_exit_codes(live_api: str, tiny_run: Path) -> None:
    run = tiny_run.name
    assert (
        main(
            [
                "gate",
                "--url",
                live_api,
                "--run",
                run,
                "--max-alpha",
                "100",
                "--max-untrusted-share",
                "1",
            ]
        )
        == 0
    )
    assert main(["gate", "--url", live_api, "--run", run, "--max-alpha", "0.5"]) == 1
    assert main(["gate", "--url", live_api, "--run", "no-such-run"]) == 2
    assert main(["gate", "--url", "http://127.0.0.1:9", "--run", run]) == 2


def test_db_upgrade_and_token_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert _cli("db", "upgrade", "--db", url).returncode == 0
    created = _cli("token", "create", "ci", "--db", url)
    assert created.returncode == 0, created.stderr
    assert len(created.stdout.strip()) >= 32


def test_parser_knows_every_documented_command() -> None:
    parser = build_parser()
    for argv in (
        ["up", "runs/x"],
        ["watch", "runs/x", "--reanalyze"],
        ["watch", "--max-jobs", "3", "--exit-when-idle", "60", "--health-port", "8081"],
        ["watch", "runs/x", "--discover-only"],
        ["serve"],
        ["analyze", "x", "--format", "json"],
        ["gate", "--url", "u", "--run", "r"],
        ["db", "upgrade"],
        ["db", "queue-depth", "--sql"],
        ["token", "create", "n"],
        ["token", "list"],
        ["token", "create", "n", "--scope", "read", "--expires-in", "7"],
        ["token", "revoke", "n"],
        ["runs", "list"],
    ):
        parser.parse_args(argv)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_a_type_and_a_help_text() -> None:
    missing = []
    for prog, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not action.help:
                missing.append(f"{prog} {name}: no help")
            takes_value = action.nargs != 0
            if takes_value and action.type is None and action.choices is None:
                missing.append(f"{prog} {name}: no type")
    assert missing == []


@pytest.mark.parametrize(
    "args",
    [
        ["watch", "--once", "--max-jobs", "2"],
        ["watch", "--once", "--exit-when-idle", "5"],
        ["watch", "--discover-only", "--max-jobs", "2"],
    ],
)
def test_worker_modes_that_contradict_each_other_are_refused(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    assert "--max-jobs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gate", "--url", "u", "--run", "r", "--max-untrusted-share", "1.5"], "between 0 and 1"),
        (["gate", "--url", "u", "--run", "r", "--step", "-3"], "is not a step"),
        (["gate", "--url", "u", "--run", "r", "--step", str(2**64)], "is not a step"),
        (["up", "runs", "--port", "70000"], "is not a port"),
        (["watch", "--poll", "0"], "not a positive number"),
        (["watch", "--max-jobs", "0"], "not a positive whole number"),
        (["watch", "--max-jobs", "2.5"], "not a positive whole number"),
        (["watch", "--exit-when-idle", "-1"], "not a finite number of seconds"),
        (["watch", "--exit-when-idle", "nan"], "not a finite number of seconds"),
        (["watch", "--once", "--discover-only"], "not allowed with argument"),
    ],
)
def test_bad_option_values_are_refused_with_a_reason(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
