"""docs/EARLY_WARNING.md: would watching alpha have warned, and how early? Runs made to go wrong.

Trains the demo's tiny Llama-style model (``alphawatch.workers.demo_run``: stdlib bytes, nothing
downloaded, seeded) in pairs, a healthy run and the same run with one known pathology, saving a
Trainer-style checkpoint every few steps; analyses every checkpoint with the real worker
(``Watcher`` on an SQLite database, as ``alphawatch up`` runs it) and reads the numbers back
through the REST API (``/gate``, ``/flags``, ``PUT /gate-rules``), as a user would. Then, per
pathology and seed, the first step at which a loss-based alarm fires and the first step at which
each alphawatch signal fires; thresholds are calibrated on the healthy runs of some seeds and the
gate preset chosen there is evaluated on the other seeds (held out).

    .venv/bin/python scripts/early_warning.py             # the full run the document reports
    .venv/bin/python scripts/early_warning.py --quick     # CI-sized: results.json only
    .venv/bin/python scripts/early_warning.py --render    # the document from docs' results

Training and analysis are cached under ``--workdir``: a second call trains and analyses only
what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "EARLY_WARNING.md"
RESULTS = ROOT / "docs" / "early_warning" / "results.json"
IMG = ROOT / "docs" / "img"
PRESET = "early-warning"

# The healthy recipe: the demo model with a warm-up, gradient clipping and weight decay, and a
# held-out tail of the corpus for a validation loss. Each pathology changes one thing.
RECIPE: dict[str, Any] = {
    "d_model": 128,
    "n_layers": 2,
    "batch_size": 8,
    "seq_len": 64,
    "lr": 1e-2,
    "warmup_steps": 30,
    "grad_clip": 1.0,
    "weight_decay": 0.1,
    "val_bytes": 200_000,
    "val_batches": 8,
}
# name -> (what it changes, steps as a multiple of the base length, what it stands for)
PATHOLOGIES: dict[str, tuple[dict[str, Any], float, str]] = {
    "lr_too_high": ({"lr": 0.1}, 1.0, "learning rate 10x the healthy one (0.1 vs 0.01)"),
    "no_warmup_no_clip": (
        {"warmup_steps": 0, "grad_clip": None, "lr": 0.03},
        1.0,
        "no warm-up and no gradient clipping (at 3x the healthy learning rate)",
    ),
    "repetition": (
        {"train_slice": 4_096},
        2.0,
        "every window drawn from the first 4 KiB of the training bytes (memorisation)",
    ),
    "no_weight_decay_long": ({"weight_decay": 0.0}, 2.0, "weight decay off, a 2x longer run"),
}
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "base_steps": 100,
        "save_every": 10,
        "seeds": [0, 1, 2, 3, 4],
        "calibration_seeds": [0, 1],
    },
    "quick": {
        "base_steps": 40,
        "save_every": 10,
        "seeds": [0],
        "calibration_seeds": [0],
        "recipe": {"d_model": 64, "batch_size": 4, "val_batches": 2},
    },
}
# Alarms are counted from this step on: before it an untrained model's spectra have no trusted
# layer and no power-law tail to fit, on healthy runs as on any.
ARM_STEP = 40
QUICK_ARM_STEP = 20
# Loss-based alarms, what people watch today.
SPIKE_FACTOR = 1.5  # training loss above 1.5x its running minimum (or not finite)
SPIKE_WINDOW = 5  # ... the loss averaged over the last 5 steps, as a smoothed loss curve shows
RISING_K = 3  # validation loss higher than the checkpoint before, k checkpoints in a row
# Signals read from alphawatch after each analysed checkpoint.
SIGNALS = (
    "alpha_low",
    "alpha_high",
    "max_delta",
    "untrusted_share",
    "correlation_trap",
    "rank_collapse",
)
# What a gate rule can express: min_alpha, max_alpha, max_delta, max_untrusted_share.
GATE_SIGNALS = ("alpha_low", "alpha_high", "max_delta", "untrusted_share")
# Post hoc, on every seed: how a lower band's edge trades detections for false alarms.
SWEEP_MIN_ALPHA = (1.6, 1.7, 1.8, 1.9, 2.0, 2.1)
# A-priori thresholds: the server's default band (the trust thresholds' over/under-trained
# labels), a round 0.5 for alpha's jump between two saves, half the layers untrusted, any trap.
PRIOR: dict[str, Any] = {
    "min_alpha": 2.0,
    "max_alpha": 6.0,
    "max_delta": 0.5,
    "max_untrusted_share": 0.5,
    "max_traps": 0,
    "max_collapsed": 0,
}
# Calibrated thresholds: the most extreme value on the calibration seeds' healthy runs (armed
# checkpoints only), widened by these margins.
BAND_MARGIN = 0.25
DELTA_FACTOR = 1.25
SHARE_MARGIN = 0.1


# ---------------------------------------------------------------------------------------------
# Training


def run_name(kind: str, seed: int) -> str:
    return f"{kind}-s{seed}"


def plan(mode: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run to train: a healthy one per seed (as long as the longest pathology, so each
    pathology compares with its prefix: the schedule is constant after the warm-up) and each
    pathology per seed."""
    recipe = {**RECIPE, **mode.get("recipe", {})}
    base = int(mode["base_steps"])
    longest = max(int(base * factor) for _, factor, _ in PATHOLOGIES.values())
    runs = []
    for seed in mode["seeds"]:
        runs.append(
            {
                "name": run_name("healthy", seed),
                "kind": "healthy",
                "seed": seed,
                "steps": longest,
                "train": recipe,
            }
        )
        for kind, (changes, factor, _) in PATHOLOGIES.items():
            runs.append(
                {
                    "name": run_name(kind, seed),
                    "kind": kind,
                    "seed": seed,
                    "steps": int(base * factor),
                    "train": {**recipe, **changes},
                }
            )
    return runs


def _trained(folder: Path) -> Path | None:
    """The run's final checkpoint when training finished (or stopped on a non-finite loss)."""
    done = folder / "done.json"
    return folder if done.exists() else None


def train_one(run: dict[str, Any], runs_dir: Path, save_every: int) -> str:
    """Train one run into ``runs_dir/<name>/`` unless it is there already; returns its name."""
    import torch

    from alphawatch.workers.demo_run import train

    folder = runs_dir / run["name"]
    if _trained(folder):
        return str(run["name"])
    torch.set_num_threads(1)
    kwargs = dict(run["train"])
    started = time.monotonic()
    log: list[dict[str, float]] = []
    paths = train(
        folder,
        steps=run["steps"],
        save_every=save_every,
        seed=run["seed"],
        stop_on_nonfinite=True,
        on_log=log.append,
        **kwargs,
    )
    # Every entry, a non-finite loss after the last save included (JSON has no NaN: null).
    entries = [{k: (v if math.isfinite(v) else None) for k, v in e.items()} for e in log]
    (folder / "log_history.json").write_text(json.dumps(entries))
    (folder / "done.json").write_text(
        json.dumps({"checkpoints": len(paths), "train_s": time.monotonic() - started})
    )
    return str(run["name"])


def history_of(folder: Path) -> tuple[list[float], list[tuple[int, float]]]:
    """Training loss per step and (step, eval_loss) per save, from the last trainer_state.json
    (a diverged run's last entries come after its last checkpoint: read from the log file)."""
    log = folder / "log_history.json"
    if log.exists():
        history = json.loads(log.read_text())
    else:
        last = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    train = [math.nan if e["loss"] is None else float(e["loss"]) for e in history if "loss" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in history if "eval_loss" in e]
    return train, evals


# ---------------------------------------------------------------------------------------------
# Analysis, with the real worker, read back through the API


def analyse(workdir: Path, names: Iterable[str]) -> None:
    """Analyse every checkpoint of these runs with the worker (what is done already is kept)."""
    from alphawatch.workers.watcher import Watcher

    folders = [workdir / "runs" / n for n in names]
    Watcher(_settings(workdir), folders).run_once()


def _settings(workdir: Path) -> Any:
    from alphawatch.settings import Settings

    return Settings(
        database_url=f"sqlite:///{workdir / 'alphawatch.db'}",
        allowed_roots=[workdir / "runs"],
        device="cpu",
        settle_s=0.0,
        poll_interval_s=0.2,
    )


def read_back(workdir: Path, names: Sequence[str], preset: dict[str, Any]) -> dict[str, Any]:
    """Per run, per analysed checkpoint: the trusted median alpha, its change since the save
    before, the untrusted share (all from ``GET /gate``), trap and rank-collapse counts
    (``GET /flags``); and the verdict of the named preset (``PUT /gate-rules {"preset"}``, then
    ``GET /gate?step=``) at each step."""
    from fastapi.testclient import TestClient

    from alphawatch.service.api import create_app
    from alphawatch.service.db.session import make_engine, session_scope
    from alphawatch.service.db.tokens import TokenScope, create_token

    settings = _settings(workdir)
    with session_scope(make_engine(settings.database_url)) as session:
        token = create_token(session, name=f"early-{time.time_ns()}", scope=TokenScope.WRITE)
    auth = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {}
    with TestClient(create_app(settings)) as client:
        api = "/api/v1"
        ids = {r["name"]: r["id"] for r in _all_runs(client)}
        for name in names:
            rid = ids[name]
            flags = {p["step"]: p for p in client.get(f"{api}/runs/{rid}/flags").json()["points"]}
            steps = sorted(flags)
            series: dict[str, list[Any]] = {
                k: []
                for k in (
                    "step",
                    "median",
                    "delta",
                    "untrusted_share",
                    "traps",
                    "collapsed",
                    "n_layers",
                    "n_used",
                    "preset_fail",
                )
            }
            put = client.put(f"{api}/runs/{rid}/gate-rules", json={"preset": PRESET}, headers=auth)
            put.raise_for_status()
            stored = put.json()["rules"]
            if any(stored[k] != v for k, v in preset.items()):
                raise RuntimeError(f"preset {PRESET} stored as {stored}, expected {preset}")
            for step in steps:
                # Every rule off but max_delta (huge): the value, share and delta, no verdict.
                probe = client.get(
                    f"{api}/runs/{rid}/gate",
                    params={
                        "step": step,
                        "max_delta": 1e9,
                        "min_alpha": -1e9,
                        "max_alpha": 1e9,
                        "max_untrusted_share": 1.0,
                    },
                ).json()
                verdict = client.get(f"{api}/runs/{rid}/gate", params={"step": step}).json()
                series["step"].append(step)
                series["median"].append(probe["value"])
                series["delta"].append(probe["delta"])
                series["untrusted_share"].append(probe["untrusted_share"])
                series["traps"].append(flags[step]["correlation_trap"])
                series["collapsed"].append(flags[step]["rank_collapse"])
                series["n_layers"].append(flags[step]["n_layers"])
                series["n_used"].append(probe.get("n_used") or 0)
                series["preset_fail"].append(
                    None if verdict["passed"] else verdict["violations"][0]["rule"]
                )
            out[name] = series
    return out


def _all_runs(client: Any) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    while True:
        page = client.get("/api/v1/runs", params={"limit": 100, "offset": len(runs)}).json()
        runs.extend(page["runs"])
        if len(page["runs"]) < 100:
            return runs


# ---------------------------------------------------------------------------------------------
# Alarms


def loss_alarms(train: Sequence[float], evals: Sequence[tuple[int, float]]) -> dict[str, Any]:
    """First step of each loss-based alarm (None: never fired)."""
    spike = None
    low = math.inf
    for step, value in enumerate(train, start=1):
        if not math.isfinite(value):
            spike = step
            break
        window = train[max(0, step - SPIKE_WINDOW) : step]
        if len(window) < SPIKE_WINDOW:
            continue
        smooth = sum(window) / len(window)
        if smooth > SPIKE_FACTOR * low:
            spike = step
            break
        low = min(low, smooth)
    rising = None
    run = 0
    for (_, before), (step, value) in itertools.pairwise(evals):
        run = run + 1 if value > before else 0
        if run >= RISING_K:
            rising = step
            break
    fired = [s for s in (spike, rising) if s is not None]
    return {"train_spike": spike, "val_rising": rising, "any": min(fired) if fired else None}


def signal_values(series: dict[str, Any], i: int) -> dict[str, float | None]:
    n = series["n_layers"][i] or 1
    return {
        "median": series["median"][i],
        "delta": series["delta"][i],
        "untrusted_share": series["untrusted_share"][i],
        "traps": series["traps"][i] / n,
        "collapsed": series["collapsed"][i] / n,
    }


def fires(signal: str, v: dict[str, float | None], t: dict[str, Any]) -> bool:
    """Whether one signal fires at one checkpoint under thresholds ``t``."""
    if signal == "alpha_low":  # no trusted layer fails the gate too
        m = v["median"]
        return m is None or m < t["min_alpha"]
    if signal == "alpha_high":
        m = v["median"]
        return m is not None and m > t["max_alpha"]
    if signal == "max_delta":
        d = v["delta"]
        return d is not None and abs(d) > t["max_delta"]
    if signal == "untrusted_share":
        s = v["untrusted_share"]
        return s is not None and s > t["max_untrusted_share"]
    if signal == "correlation_trap":
        return (v["traps"] or 0) > t["max_traps"]
    if signal == "rank_collapse":
        return (v["collapsed"] or 0) > t["max_collapsed"]
    raise ValueError(signal)


def first_fire(series: dict[str, Any], signal: str, t: dict[str, Any], arm: int) -> int | None:
    for i, step in enumerate(series["step"]):
        if step >= arm and fires(signal, signal_values(series, i), t):
            return int(step)
    return None


def calibrate(healthy: Sequence[dict[str, Any]], arm: int) -> dict[str, Any]:
    """Thresholds just outside what the healthy runs showed from ``arm`` on."""
    vals = [signal_values(s, i) for s in healthy for i, st in enumerate(s["step"]) if st >= arm]
    medians = [v["median"] for v in vals if v["median"] is not None]
    deltas = [abs(v["delta"]) for v in vals if v["delta"] is not None]
    shares = [v["untrusted_share"] for v in vals if v["untrusted_share"] is not None]
    return {
        "min_alpha": round(min(medians) - BAND_MARGIN, 2) if medians else PRIOR["min_alpha"],
        "max_alpha": round(max(medians) + BAND_MARGIN, 2) if medians else PRIOR["max_alpha"],
        "max_delta": round(max(deltas) * DELTA_FACTOR, 2) if deltas else PRIOR["max_delta"],
        "max_untrusted_share": round(min(1.0, max(shares) + SHARE_MARGIN), 2)
        if shares
        else PRIOR["max_untrusted_share"],
        "max_traps": max((v["traps"] or 0 for v in vals), default=0),
        "max_collapsed": max((v["collapsed"] or 0 for v in vals), default=0),
    }


def gate_rules_of(thresholds: dict[str, Any], signals: Iterable[str]) -> dict[str, Any]:
    """The gate rules that express these signals (the others off)."""
    chosen = set(signals)
    rules: dict[str, Any] = {
        "stat": "median",
        "filter": "trusted",
        "min_alpha": None,
        "max_alpha": None,
        "max_delta": None,
        "max_untrusted_share": None,
        "ref_step": None,
    }
    if "alpha_low" in chosen:
        rules["min_alpha"] = thresholds["min_alpha"]
    if "alpha_high" in chosen:
        rules["max_alpha"] = thresholds["max_alpha"]
    if "max_delta" in chosen:
        rules["max_delta"] = thresholds["max_delta"]
    if "untrusted_share" in chosen:
        rules["max_untrusted_share"] = thresholds["max_untrusted_share"]
    return rules


def choose(table: Sequence[dict[str, Any]], healthy_fires: dict[str, list[Any]]) -> list[str]:
    """The gate signals worth a rule, judged on the calibration seeds only: quiet on every
    healthy run, and on some pathology firing no later than the loss alarm (or where it never
    fires)."""
    chosen = []
    for signal in GATE_SIGNALS:
        if any(step is not None for step in healthy_fires[signal]):
            continue
        useful = False
        for row in table:
            step = row["signals"][signal]
            if step is None:
                continue
            if row["loss_alarm_step"] is None or step <= row["loss_alarm_step"]:
                useful = True
        if useful:
            chosen.append(signal)
    return chosen


def preset_mismatches(series: dict[str, Any], preset: dict[str, Any]) -> int:
    """Checkpoints where the API's verdict under the preset differs from these signals' own
    reading of the same rules (0: the study and the gate agree)."""
    t = {**PRIOR, **{k: v for k, v in preset.items() if v is not None}}
    on = []
    if preset.get("min_alpha") is not None:
        on.append("alpha_low")
    if preset.get("max_alpha") is not None:
        on.append("alpha_high")
    if preset.get("max_delta") is not None:
        on.append("max_delta")
    if preset.get("max_untrusted_share") is not None:
        on.append("untrusted_share")
    wrong = 0
    for i, rule in enumerate(series["preset_fail"]):
        v = signal_values(series, i)
        ours = v["median"] is None or any(fires(s, v, t) for s in on)
        wrong += ours != (rule is not None)
    return wrong


def first_preset_fail(series: dict[str, Any], arm: int) -> tuple[int | None, str | None]:
    for step, rule in zip(series["step"], series["preset_fail"], strict=True):
        if step >= arm and rule is not None:
            return int(step), str(rule)
    return None, None


# ---------------------------------------------------------------------------------------------
# The study


def study(mode_name: str, workdir: Path, jobs: int) -> dict[str, Any]:
    from alphawatch.gate_rules import preset_rules
    from alphawatch.service.db.migrations import upgrade

    mode = MODES[mode_name]
    arm = QUICK_ARM_STEP if mode_name == "quick" else ARM_STEP
    runs = plan(mode)
    runs_dir = workdir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    upgrade(_settings(workdir).database_url)
    started = time.monotonic()
    # Train in a pool while this process analyses what is finished, as a worker beside a run.
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=spawn) as pool:
        pending: list[Future[str]] = [
            pool.submit(train_one, run, runs_dir, mode["save_every"]) for run in runs
        ]
        for future in pending:
            name = future.result()
            analyse(workdir, [name])
            print(f"[{time.monotonic() - started:6.0f}s] {name} trained and analysed", flush=True)
    preset = preset_rules(PRESET)
    series = read_back(workdir, [r["name"] for r in runs], preset)
    records: dict[str, Any] = {}
    for run in runs:
        train, evals = history_of(runs_dir / run["name"])
        records[run["name"]] = {
            "kind": run["kind"],
            "seed": run["seed"],
            "steps": run["steps"],
            "train_loss": [round(x, 4) if math.isfinite(x) else None for x in train],
            "eval_loss": [[s, round(x, 4)] for s, x in evals],
            "series": series[run["name"]],
        }
    calib = [s for s in mode["seeds"] if s in mode["calibration_seeds"]]
    held = [s for s in mode["seeds"] if s not in calib] or calib
    results = assess(records, mode, arm, calib, held, preset)
    results["config"] = {
        "mode": mode_name,
        "recipe": {**RECIPE, **mode.get("recipe", {})},
        "pathologies": {
            k: {"changes": c, "steps": int(mode["base_steps"] * f), "what": w}
            for k, (c, f, w) in PATHOLOGIES.items()
        },
        "base_steps": mode["base_steps"],
        "save_every": mode["save_every"],
        "seeds": mode["seeds"],
        "calibration_seeds": calib,
        "held_out_seeds": held,
        "held_out": held != calib,
        "arm_step": arm,
        "spike_factor": SPIKE_FACTOR,
        "spike_window": SPIKE_WINDOW,
        "rising_k": RISING_K,
        "prior": PRIOR,
        "preset_name": PRESET,
        "preset": preset,
        "wall_s": round(time.monotonic() - started),
        "cpu_count": os.cpu_count(),
    }
    results["runs"] = records
    return results


def _prefix(series: dict[str, Any], steps: int) -> dict[str, Any]:
    """A healthy run's checkpoints up to ``steps`` (to compare with a shorter pathology)."""
    keep = [i for i, s in enumerate(series["step"]) if s <= steps]
    return {k: [v[i] for i in keep] for k, v in series.items()}


def assess(
    records: dict[str, Any],
    mode: dict[str, Any],
    arm: int,
    calib: list[int],
    held: list[int],
    preset: dict[str, Any],
) -> dict[str, Any]:
    """Alarm steps per run and signal; thresholds from ``calib``; the preset on ``held``."""
    healthy = {r["seed"]: r for r in records.values() if r["kind"] == "healthy"}
    thresholds = {
        "prior": PRIOR,
        "calibrated": calibrate([healthy[s]["series"] for s in calib], arm),
    }
    table: list[dict[str, Any]] = []
    for name, rec in records.items():
        if rec["kind"] == "healthy":
            continue
        loss = loss_alarms(
            [math.nan if x is None else x for x in rec["train_loss"]],
            [tuple(e) for e in rec["eval_loss"]],
        )
        row: dict[str, Any] = {
            "name": rec["kind"],
            "seed": rec["seed"],
            "run": name,
            "held_out": rec["seed"] in held and held != calib,
            "loss_alarm_step": loss["any"],
            "loss_rules": {k: loss[k] for k in ("train_spike", "val_rising")},
            "last_step": rec["series"]["step"][-1] if rec["series"]["step"] else None,
        }
        # The ground truth that the run went wrong: its validation loss at its last save
        # against the healthy run's at the same step.
        evals = {int(a): b for a, b in rec["eval_loss"]}
        well = {int(a): b for a, b in healthy[rec["seed"]]["eval_loss"]}
        last = max(evals) if evals else None
        row["eval_loss_end"] = evals.get(last) if last is not None else None
        row["healthy_eval_loss_end"] = well.get(last) if last is not None else None
        for which, t in thresholds.items():
            row[f"signals_{which}"] = {s: first_fire(rec["series"], s, t, arm) for s in SIGNALS}
        row["signals"] = row["signals_calibrated"]
        step, rule = first_preset_fail(rec["series"], arm)
        row["preset_mismatches"] = preset_mismatches(rec["series"], preset)
        row["alphawatch_alarm_step"] = step
        row["signal"] = rule
        row["lead_steps"] = None if step is None or loss["any"] is None else int(loss["any"] - step)
        table.append(row)
    # False alarms: each signal and loss rule on the healthy runs, over each pathology's span.
    spans = sorted({r["steps"] for r in records.values() if r["kind"] != "healthy"})
    false_alarms: dict[str, Any] = {}
    healthy_fires: dict[str, list[Any]] = {s: [] for s in SIGNALS}
    for seed, rec in sorted(healthy.items()):
        full = rec["series"]
        loss = loss_alarms(
            [math.nan if x is None else x for x in rec["train_loss"]],
            [tuple(e) for e in rec["eval_loss"]],
        )
        entry: dict[str, Any] = {"loss": loss}
        for which, t in thresholds.items():
            entry[which] = {s: first_fire(full, s, t, arm) for s in SIGNALS}
        entry["preset"] = first_preset_fail(full, arm)[0]
        entry["checkpoints"] = sum(1 for s in full["step"] if s >= arm)
        false_alarms[run_name("healthy", seed)] = entry
        if seed in calib:
            for s in SIGNALS:
                healthy_fires[s].append(entry["calibrated"][s])
    chosen = choose([r for r in table if r["seed"] in calib], healthy_fires)
    selected = gate_rules_of(thresholds["calibrated"], chosen)
    summary = summarise(table, false_alarms, held)
    return {
        "sweep": sweep(records, table, arm),
        "pathologies": table,
        "false_alarms": false_alarms,
        "thresholds": thresholds,
        "selected_signals": chosen,
        "selected_rules": selected,
        "spans": spans,
        "summary": summary,
    }


def sweep(
    records: dict[str, Any], table: Sequence[dict[str, Any]], arm: int
) -> list[dict[str, Any]]:
    """Post hoc, on every seed (calibration ones included): for each lower edge of the band,
    per pathology how many runs it caught and its median lead over the loss alarm, and how
    many healthy runs it fired on, and first where."""
    out = []
    for edge in SWEEP_MIN_ALPHA:
        t = {**PRIOR, "min_alpha": edge}
        row: dict[str, Any] = {"min_alpha": edge, "pathologies": {}}
        for kind in PATHOLOGIES:
            rows = [r for r in table if r["name"] == kind]
            steps = [first_fire(records[r["run"]]["series"], "alpha_low", t, arm) for r in rows]
            leads = [
                r["loss_alarm_step"] - st
                for r, st in zip(rows, steps, strict=True)
                if st is not None and r["loss_alarm_step"] is not None
            ]
            fired = [st for st in steps if st is not None]
            row["pathologies"][kind] = {
                "fired": len(fired),
                "of": len(rows),
                "median_step": _median(fired),
                "median_lead": _median(leads),
            }
        healthy = [
            first_fire(rec["series"], "alpha_low", t, arm)
            for rec in records.values()
            if rec["kind"] == "healthy"
        ]
        false = [st for st in healthy if st is not None]
        row["healthy"] = {
            "fired": len(false),
            "of": len(healthy),
            "first": min(false, default=None),
        }
        out.append(row)
    return out


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarise(
    table: Sequence[dict[str, Any]], false_alarms: dict[str, Any], held: list[int]
) -> dict[str, Any]:
    """Per pathology and alarm: how many held-out seeds it fired on, the median and range of
    its first step and of its lead over the loss alarm."""
    out: dict[str, Any] = {}
    for kind in PATHOLOGIES:
        rows = [r for r in table if r["name"] == kind and r["seed"] in held]
        per: dict[str, Any] = {}
        alarms: dict[str, Callable[[dict[str, Any]], int | None]] = {
            "loss": lambda r: r["loss_alarm_step"],
            "train_spike": lambda r: r["loss_rules"]["train_spike"],
            "val_rising": lambda r: r["loss_rules"]["val_rising"],
            "preset": lambda r: r["alphawatch_alarm_step"],
        }
        for s in SIGNALS:
            alarms[f"prior:{s}"] = lambda r, s=s: r["signals_prior"][s]
            alarms[f"calibrated:{s}"] = lambda r, s=s: r["signals_calibrated"][s]
        for alarm, get in alarms.items():
            steps = [get(r) for r in rows]
            fired = [s for s in steps if s is not None]
            leads = [
                r["loss_alarm_step"] - st
                for r, st in zip(rows, steps, strict=True)
                if st is not None and r["loss_alarm_step"] is not None
            ]
            per[alarm] = {
                "fired": len(fired),
                "of": len(rows),
                "median_step": _median(fired),
                "min_step": min(fired) if fired else None,
                "max_step": max(fired) if fired else None,
                "median_lead": _median(leads),
                "min_lead": min(leads) if leads else None,
                "max_lead": max(leads) if leads else None,
            }
        out[kind] = per
    return out


# ---------------------------------------------------------------------------------------------
# The document


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}f}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _span(cell: dict[str, Any], key: str) -> str:
    med = cell[f"median_{key}"]
    if med is None:
        return "–"
    lo = cell["min_step" if key == "step" else "min_lead"]
    hi = cell["max_step" if key == "step" else "max_lead"]
    return f"{_f(med)} [{_f(lo)}, {_f(hi)}]"


def render(results: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """The markdown document of these results (a pure function of them)."""
    cfg = results["config"]
    rec = cfg["recipe"]
    held = cfg["held_out_seeds"]
    lines: list[str] = []
    add = lines.append
    add("# Does alphawatch catch trouble early?")
    add("")
    add(
        "<!-- Generated by scripts/early_warning.py from docs/early_warning/results.json; "
        "do not edit. -->"
    )
    add("")
    add(
        "Runs made to go wrong on purpose, each beside the same run done right, analysed "
        "checkpoint after checkpoint by the real worker and read back through the API. The "
        "question: does an alphawatch signal fire before the loss-based alarms people watch "
        "today, and does it stay quiet on healthy runs?"
    )
    add("")
    add("## Set-up")
    add("")
    add(
        f"- Model: the demo's tiny Llama-style decoder (`alphawatch.workers.demo_run`), "
        f"d_model {rec['d_model']}, {rec['n_layers']} blocks, 16 weight matrices, on bytes of the "
        f"Python standard library; batch {rec['batch_size']} x {rec['seq_len']} bytes; AdamW."
    )
    add(
        f"- Healthy recipe: lr {rec['lr']:g}, linear warm-up over {rec['warmup_steps']} steps, "
        f"gradient clipping at {rec['grad_clip']:g}, weight decay {rec['weight_decay']:g}; "
        f"the corpus' last {rec['val_bytes']:,} bytes are held out for a validation loss, "
        f"logged as `eval_loss` at each save."
    )
    add(
        f"- A checkpoint every {cfg['save_every']} steps. Seeds {cfg['seeds']}; thresholds "
        f"calibrated and the preset chosen on seeds {cfg['calibration_seeds']}, evaluated on "
        f"{'held-out ' if cfg['held_out'] else ''}seeds {held}."
    )
    add("- Pathologies (one change each from the healthy recipe):")
    add("")
    add("| pathology | change | steps |")
    add("|---|---|---|")
    for kind, p in cfg["pathologies"].items():
        add(f"| `{kind}` | {p['what']} | {p['steps']} |")
    add("")
    add(
        "The healthy run of each seed is as long as the longest pathology; a shorter pathology "
        "is compared with its prefix (the schedule is constant after the warm-up, so the prefix "
        "is the shorter healthy run)."
    )
    add("")
    add("## Alarm rules")
    add("")
    add(
        f"- **Loss** (what people watch): `train_spike`, the training loss averaged over the "
        f"last {cfg['spike_window']} steps above {cfg['spike_factor']:g}x the running minimum "
        f"of that average, or a loss not finite (checked every step); "
        f"`val_rising`, the validation loss higher than at the save before, "
        f"{cfg['rising_k']} saves in a row. The loss alarm is the earlier of the two."
    )
    add(
        "- **alphawatch** (checked at each analysed checkpoint, read from `GET /runs/{id}/gate` "
        "and `GET /runs/{id}/flags`): `alpha_low`, the median alpha of trusted layers below "
        "`min_alpha` (or no trusted layer: the gate fails then too); `alpha_high`, that median "
        "above `max_alpha`; `max_delta`, that median moving more than a limit since "
        "the checkpoint before; `untrusted_share`, more than a share of layers untrusted; "
        "`correlation_trap` and `rank_collapse`, more than a share of layers flagged. Update "
        "spectra are not measured here (another change adds them)."
    )
    add(
        f"- Every alarm is counted from step {cfg['arm_step']} on: before it, an untrained "
        "model has no trusted layer, and a gate fails on healthy and sick runs alike. The loss "
        "rules need no such grace; they get none."
    )
    add("")
    th = results["thresholds"]
    add(
        "Thresholds, a-priori and calibrated (the most extreme healthy value on the calibration "
        "seeds from the arming step on, widened):"
    )
    add("")
    add("| threshold | a-priori | calibrated |")
    add("|---|---|---|")
    for key in (
        "min_alpha",
        "max_alpha",
        "max_delta",
        "max_untrusted_share",
        "max_traps",
        "max_collapsed",
    ):
        add(f"| `{key}` | {_f(th['prior'][key], 3)} | {_f(th['calibrated'][key], 3)} |")
    add("")
    add("## Lead time on held-out seeds")
    add("")
    add(
        "First alarm step, median [min, max] over the seeds it fired on, and how many seeds "
        "it fired on; lead = loss alarm step - signal step (positive: alphawatch first), over "
        "seeds where both fired."
    )
    add("")
    summary = results["summary"]
    alarms = ["loss", "train_spike", "val_rising", "preset"]
    alarms += [f"prior:{s}" for s in SIGNALS] + [f"calibrated:{s}" for s in SIGNALS]
    for kind in cfg["pathologies"]:
        add(f"### `{kind}`")
        add("")
        add("| alarm | fired | first step | lead (steps) |")
        add("|---|---|---|---|")
        for alarm in alarms:
            cell = summary[kind][alarm]
            add(
                f"| {alarm} | {cell['fired']}/{cell['of']} | {_span(cell, 'step')} | "
                f"{_span(cell, 'lead')} |"
            )
        add("")
        if images and kind in images:
            add(f"![{kind}]({images[kind]})")
            add("")
    add("## False alarms on the healthy runs")
    add("")
    add("First step each alarm fired on a healthy run (– : never), over its whole length.")
    add("")
    head = ["run", "checkpoints", "loss", "preset"]
    head += [f"prior:{s}" for s in SIGNALS] + [f"calibrated:{s}" for s in SIGNALS]
    add("| " + " | ".join(head) + " |")
    add("|" + "---|" * len(head))
    for name, e in results["false_alarms"].items():
        cells = [name, str(e["checkpoints"]), _f(e["loss"]["any"]), _f(e["preset"])]
        cells += [_f(e["prior"][s]) for s in SIGNALS]
        cells += [_f(e["calibrated"][s]) for s in SIGNALS]
        add("| " + " | ".join(cells) + " |")
    add("")
    add("## Every run")
    add("")
    add(
        "| pathology | seed | held out | val loss at end (healthy) | loss alarm | spike | "
        "val rising | preset alarm | signal | lead |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|")
    for r in results["pathologies"]:
        add(
            f"| {r['name']} | {r['seed']} | {'yes' if r['held_out'] else 'no'} | "
            f"{_f(r['eval_loss_end'], 3)} ({_f(r['healthy_eval_loss_end'], 3)}) | "
            f"{_f(r['loss_alarm_step'])} | {_f(r['loss_rules']['train_spike'])} | "
            f"{_f(r['loss_rules']['val_rising'])} | {_f(r['alphawatch_alarm_step'])} | "
            f"{_f(r['signal'])} | {_f(r['lead_steps'])} |"
        )
    add("")
    add("## The lower edge of the band, swept (post hoc, every seed)")
    add("")
    add(
        "Not a held-out result: every seed, calibration ones included, for each `min_alpha` "
        "(the signal that led, see above): runs caught, median first step, median lead over "
        "the loss alarm (where both fired), and the healthy runs it fired on."
    )
    add("")
    kinds = list(cfg["pathologies"])
    add("| min_alpha | " + " | ".join(f"`{k}`" for k in kinds) + " | healthy (first step) |")
    add("|---|" + "---|" * len(kinds) + "---|")
    for row in results["sweep"]:
        cells = [_f(row["min_alpha"])]
        for k in kinds:
            c = row["pathologies"][k]
            cells.append(
                f"{c['fired']}/{c['of']}, step {_f(c['median_step'])}, lead {_f(c['median_lead'])}"
            )
        h = row["healthy"]
        cells.append(f"{h['fired']}/{h['of']} ({_f(h['first'])})")
        add("| " + " | ".join(cells) + " |")
    add("")
    add("## The preset")
    add("")
    sel = results["selected_rules"]
    add(
        f"Chosen on the calibration seeds: the gate signals quiet on every healthy run there "
        f"that fired on some pathology no later than the loss alarm: "
        f"{', '.join(results['selected_signals']) or 'none'}. As gate rules:"
    )
    add("")
    add("```json")
    add(json.dumps(sel, sort_keys=True))
    add("```")
    add("")
    add(
        "The shipped preset is exactly these rules."
        if sel == cfg["preset"]
        else "The shipped preset differs from these rules (the study ran with another "
        "definition): run the script again."
    )
    add("")
    add(
        f"Shipped as `{cfg['preset_name']}` (`alphawatch/gate_rules.py`, `PRESETS`), selected "
        f'with `PUT /api/v1/runs/{{id}}/gate-rules {{"preset": "{cfg["preset_name"]}"}}`; '
        "the `preset` rows above are its verdicts through the API:"
    )
    add("")
    add("```json")
    add(json.dumps(cfg["preset"], sort_keys=True))
    add("```")
    add("")
    add("## What the numbers say")
    add("")
    lines.extend(findings(results))
    add("")
    add("## Caveats")
    add("")
    for text in CAVEATS:
        add(f"- {text}")
    add("")
    add("## Reproduce")
    add("")
    add("```")
    add("nice -n 10 .venv/bin/python scripts/early_warning.py          # this document")
    add("nice -n 10 .venv/bin/python scripts/early_warning.py --quick  # CI-sized results.json")
    add("```")
    add("")
    add(
        f"The call that wrote these results took {cfg['wall_s']} s of wall time on "
        f"{cfg['cpu_count']} shared cores; runs trained and checkpoints analysed by an earlier "
        "call (under `--workdir`) are not done again. From scratch, on 2 cores shared with "
        "other work, the full study takes about 35 minutes."
    )
    return "\n".join(lines) + "\n"


IMAGE_NAMES = {kind: f"img/early_warning_{kind}.png" for kind in PATHOLOGIES}


def plots(results: dict[str, Any], img_dir: Path) -> dict[str, str]:
    """One figure per pathology (first held-out seed): losses and the trusted median alpha of
    the healthy and the sick run. Returns the images written (matplotlib; none without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib comes with the crosscheck extra
        return {}
    cfg = results["config"]
    seed = cfg["held_out_seeds"][0]
    runs = results["runs"]
    img_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, p in cfg["pathologies"].items():
        sick = runs[run_name(kind, seed)]
        well = runs[run_name("healthy", seed)]
        fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
        for rec, label, colour in ((well, "healthy", "tab:blue"), (sick, kind, "tab:red")):
            n = min(len(rec["train_loss"]), p["steps"])
            xs = list(range(1, n + 1))
            ys = [math.nan if v is None else v for v in rec["train_loss"][:n]]
            axes[0].plot(xs, ys, color=colour, lw=0.7, label=f"{label} train")
            ev = [e for e in rec["eval_loss"] if e[0] <= p["steps"]]
            axes[0].plot(
                [e[0] for e in ev],
                [e[1] for e in ev],
                color=colour,
                ls="--",
                marker=".",
                label=f"{label} validation",
            )
            s = _prefix(rec["series"], p["steps"])
            axes[1].plot(
                s["step"],
                [math.nan if v is None else v for v in s["median"]],
                color=colour,
                marker="o",
                ms=3,
                label=label,
            )
            axes[2].plot(
                s["step"], s["untrusted_share"], color=colour, marker="o", ms=3, label=label
            )
        row = next(r for r in results["pathologies"] if r["run"] == run_name(kind, seed))
        for ax in axes:
            ax.axvline(cfg["arm_step"], color="grey", lw=0.6, ls=":")
            if row["loss_alarm_step"] is not None:
                ax.axvline(row["loss_alarm_step"], color="black", lw=0.8, ls="--")
            if row["alphawatch_alarm_step"] is not None:
                ax.axvline(row["alphawatch_alarm_step"], color="tab:green", lw=0.8)
        axes[0].set_ylabel("loss")
        axes[0].set_ylim(top=6)
        axes[1].set_ylabel("median alpha (trusted)")
        axes[2].set_ylabel("untrusted share")
        axes[2].set_xlabel("step (dashed black: loss alarm; green: preset alarm)")
        axes[0].legend(fontsize=7, ncol=2)
        axes[0].set_title(f"{kind}, seed {seed}")
        fig.tight_layout()
        path = img_dir.parent / IMAGE_NAMES[kind]
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written[kind] = IMAGE_NAMES[kind]
    return written


CAVEATS = (
    "One tiny byte-level model on CPU, short runs: what leads here is evidence for this "
    "set-up, not a law for large models.",
    "A fixed band is blind to the step: a healthy run's median alpha falls as it trains, so a "
    "lower edge that catches a sick run early fires on the healthy one later (see the sweep). "
    "Comparing with a healthy reference run at the same step (`GET /compare`) is not a gate "
    "rule today.",
    "Alarms are armed from the same step for every alphawatch signal; the loss rules are not "
    "armed late, so early trouble counts for them and not for the spectra.",
    "The preset's thresholds are calibrated on this tiny model: a different model's healthy "
    "alpha sits elsewhere; calibrate on a healthy run of your own (this script shows how).",
    "A gate has no arming step: on a run from scratch, the first checkpoints (no trusted layer "
    "yet) fail any preset, and a first failing verdict raises an alert.",
    "The alphawatch thresholds are chosen on two seeds; the loss rules' thresholds (1.5x, 3 "
    "rises) are the usual rules of thumb, not calibrated: the validation rule is noisy here "
    "(64 held-out windows per evaluation).",
    "Update spectra (the spectra of weight changes) are not measured here.",
)


def _verdict(lead: float | None) -> str:
    if lead is None:
        return "where the loss alarm did not fire"
    if lead > 0:
        return f"a median {lead:g} steps before the loss alarm"
    if lead == 0:
        return "with the loss alarm"
    return f"a median {-lead:g} steps after the loss alarm"


def findings(results: dict[str, Any]) -> list[str]:
    """Plain-language lines drawn from the numbers (no judgement added by hand)."""
    out = []
    summary = results["summary"]
    cfg = results["config"]
    for kind in cfg["pathologies"]:
        cell = summary[kind]
        loss = cell["loss"]
        said = []
        for which in ("calibrated", "prior"):
            for s in SIGNALS:
                c = cell[f"{which}:{s}"]
                if c["fired"]:
                    said.append(
                        f"{which} `{s}` on {c['fired']}/{c['of']}, {_verdict(c['median_lead'])}"
                    )
        preset = cell["preset"]
        rows = [r for r in results["pathologies"] if r["name"] == kind and r["held_out"]]
        sick = _median([r["eval_loss_end"] for r in rows if r["eval_loss_end"] is not None])
        well = _median(
            [r["healthy_eval_loss_end"] for r in rows if r["healthy_eval_loss_end"] is not None]
        )
        out.append(
            f"- `{kind}` (final validation loss {_f(sick, 3)} against {_f(well, 3)} healthy, "
            f"median): the loss alarm fired on {loss['fired']}/{loss['of']} held-out runs "
            f"(median step {_f(loss['median_step'])}); the preset on "
            f"{preset['fired']}/{preset['of']}"
            + (f", {_verdict(preset['median_lead'])}; " if preset["fired"] else "; ")
            + ("; ".join(said) if said else "no alphawatch signal fired")
            + "."
        )
    fa = results["false_alarms"]
    held = {run_name("healthy", s) for s in cfg["held_out_seeds"]}
    n = len(held)

    def count(get: Callable[[dict[str, Any]], Any]) -> str:
        steps = sorted(get(e) for k, e in fa.items() if k in held and get(e) is not None)
        return f"{len(steps)}/{n}" + (f" (first at step {steps[0]})" if steps else "")

    out.append(
        f"- Healthy held-out runs: the loss alarm fired on {count(lambda e: e['loss']['any'])}, "
        f"the preset on {count(lambda e: e['preset'])}, the a-priori `alpha_low` (min_alpha "
        f"{_f(cfg['prior']['min_alpha'])}) on {count(lambda e: e['prior']['alpha_low'])}, the "
        f"a-priori `untrusted_share` on {count(lambda e: e['prior']['untrusted_share'])}."
    )
    return out


def write_doc(results: dict[str, Any], doc: Path, images: dict[str, str] | None) -> None:
    doc.write_text(render(results, images))


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: one seed, short runs")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where runs and the database go (default: .early_warning[_quick])",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results.json (default: docs/early_warning/results.json; quick: "
        "<workdir>/results.json)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="training processes beside analysis")
    parser.add_argument(
        "--render",
        action="store_true",
        help="only write docs/EARLY_WARNING.md from the committed results",
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(RESULTS.read_text())
        write_doc(results, DOC, image_links(results))
        return 0
    mode = "quick" if args.quick else "full"
    workdir = args.workdir or ROOT / (".early_warning_quick" if args.quick else ".early_warning")
    workdir.mkdir(parents=True, exist_ok=True)
    results = study(mode, workdir, args.jobs)
    out = args.out or (workdir / "results.json" if args.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if not args.quick:
        plots(results, IMG)
        write_doc(results, DOC, image_links(results))
        print(f"wrote {DOC}")
    return 0


def image_links(results: dict[str, Any]) -> dict[str, str]:
    """The figures the document links (those written next to it)."""
    return {k: v for k, v in IMAGE_NAMES.items() if k in results["config"]["pathologies"]}


if __name__ == "__main__":
    sys.exit(main())
