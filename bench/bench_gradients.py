"""What gradient spectra and nested widths cost on top of the weights, on one Llama checkpoint.

Writes a Hugging Face Trainer-layout checkpoint of a Llama built from a config (weights in
``model.safetensors``, ``config.json``, and ``optimizer.pt`` after real AdamW steps with the
Trainer's decay / no-decay groups), then times ``analyze_checkpoint`` on it: weights only, with
``optimizer_state``, with two nested widths, with both. Also times naming the optimizer entries
alone (meta-device model + checks, no analysis) and weightwatcher 0.7.7 on the same exp_avg
matrices (scaled as analysed), for the ratio.

    python bench/bench_gradients.py                  # hidden 768, 4 blocks
    python bench/bench_gradients.py --hidden 256 --layers 2   # a quick look
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alphawatch.trust import Thresholds  # noqa: E402
from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint  # noqa: E402
from alphawatch.workers.checkpoints import Confinement  # noqa: E402
from alphawatch.workers.checkpoints.optimizer import (  # noqa: E402
    _DECAY_RULES,
    decay_parameter_names,
    iter_exp_avg,
    unit_mean_eigenvalue,
)


def write_checkpoint(folder: Path, hidden: int, layers: int, steps: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    decay = set(decay_parameter_names(model, next(iter(_DECAY_RULES.values()))))
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (4, 64))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    checkpoint = folder / f"checkpoint-{steps}"
    model.save_pretrained(checkpoint)
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    return checkpoint


CONFIGS: dict[str, dict[str, object]] = {
    "weights": {},
    "weights + exp_avg": {"optimizer_state": True},
    "weights + nested widths": {"nested_widths": None},
    "weights + exp_avg + widths": {"optimizer_state": True, "nested_widths": None},
}


def timed(checkpoint: Path, widths: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Least CPU time per configuration over ``rounds`` rounds, the configurations interleaved
    in each round so a change of load on the machine hits them alike."""
    walls: dict[str, list[float]] = {label: [] for label in CONFIGS}
    cpus: dict[str, list[float]] = {label: [] for label in CONFIGS}
    rows: dict[str, int] = {}
    for round_ in range(rounds + 1):
        for label, extra in CONFIGS.items():
            chosen = {k: (widths if v is None else v) for k, v in extra.items()}
            options = AnalysisOptions(
                method="ww",
                thresholds=Thresholds(),
                device=torch.device("cpu"),
                confine=Confinement(None),
                **chosen,
            )  # type: ignore[arg-type]
            started, cpu = time.perf_counter(), time.process_time()
            layers = analyze_checkpoint(checkpoint, None, options).layers
            if round_:  # the first round warms up, and is not counted
                walls[label].append(time.perf_counter() - started)
                cpus[label].append(time.process_time() - cpu)
            rows[label] = len(layers)
    for label in CONFIGS:
        # CPU time too: on a shared machine wall-clock time measures the neighbours as much.
        print(
            f"  {label:<28} {rows[label]:>4} rows  {min(walls[label]):7.2f} s wall  "
            f"{min(cpus[label]):7.2f} s CPU  (least of {rounds})"
        )
    return {label: min(cpus[label]) for label in CONFIGS}


def weightwatcher_on_moments(checkpoint: Path) -> float:
    import weightwatcher as ww
    from torch import nn

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    linears = []
    for moment in iter_exp_avg(checkpoint):
        scaled = unit_mean_eigenvalue(moment).weight
        linear = nn.Linear(scaled.shape[1], scaled.shape[0], bias=False)
        linear.weight.data = scaled
        linears.append(linear)
    cpu = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww.WeightWatcher(model=nn.Sequential(*linears)).analyze(randomize=True)
    return time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import transformers

    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    widths = (args.hidden, 2 * args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp), args.hidden, args.layers, args.steps)
        print(
            f"Llama hidden {args.hidden}, intermediate {args.hidden * 8 // 3}, "
            f"{args.layers} blocks, vocab 8192; nested widths {widths}"
        )
        started = time.perf_counter()
        named = sum(1 for _ in iter_exp_avg(checkpoint))
        print(
            f"  naming {named} optimizer entries (no analysis): "
            f"{time.perf_counter() - started:.2f} s"
        )
        cpu = timed(checkpoint, widths, args.repeat)
        base, grads, nested, both = cpu.values()
        print(
            f"  CPU-time ratios to weights only: exp_avg x{grads / base:.2f}, "
            f"widths x{nested / base:.2f}, both x{both / base:.2f}"
        )
        reference = weightwatcher_on_moments(checkpoint)
        print(
            f"  weightwatcher 0.7.7 on the same exp_avg matrices (traps on): {reference:.2f} s "
            f"CPU; ours, the exp_avg part: {grads - base:.2f} s CPU "
            f"(x{reference / (grads - base):.1f})"
        )


if __name__ == "__main__":
    main()
