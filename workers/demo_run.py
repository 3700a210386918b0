"""A small, real training run for the demo and the tests.

Trains a tiny Llama-style language model (RMSNorm, attention q/k/v/o, SwiGLU gate/up/down) on
bytes of the Python standard library's own source files, which every machine has offline, and
writes Hugging Face Trainer-style ``checkpoint-<step>/`` folders: ``model.safetensors``,
``config.json`` and, last, ``trainer_state.json``. Folders are written as
``tmp-checkpoint-<step>`` and renamed, as the Trainer does, so a watcher never sees half a save.

    python -m alphawatch.workers.demo_run runs/demo --steps 300 --save-every 20 --sleep 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

_CORPUS_BYTES = 2_000_000


def load_corpus(max_bytes: int = _CORPUS_BYTES) -> torch.Tensor:
    """Bytes of the standard library's ``.py`` files, in a fixed order, as a uint8 tensor."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python source found under {stdlib}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        projected: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(b, t, d))
        return projected


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = Attention(dim, n_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        out: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return out


class Decoder(nn.Module):
    """The ``model.`` part of a Llama: embeddings, decoder blocks, final norm."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        normed: torch.Tensor = self.norm(x)
        return normed


class TinyLlama(nn.Module):
    """Llama layout with Hugging Face parameter names (``model.layers.0.self_attn.q_proj``...)."""

    def __init__(self, vocab: int, dim: int, n_layers: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.model = Decoder(vocab, dim, n_layers, n_heads, hidden)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(self.model(tokens))
        return logits


def _save(
    model: TinyLlama,
    out_dir: Path,
    step: int,
    config: dict[str, object],
    history: list[dict[str, float]],
) -> Path:
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f"tmp-checkpoint-{step}"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    state = {"global_step": step, "log_history": history, "max_steps": config["max_steps"]}
    # The Trainer writes trainer_state.json last; discovery treats it as the completion marker.
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    os.replace(tmp, final)
    return final


def _val_windows(
    val: torch.Tensor | None, seq_len: int, count: int, seed: int
) -> torch.Tensor | None:
    """Fixed held-out windows (seeded apart from the training draws), or None."""
    if val is None:
        return None
    generator = torch.Generator().manual_seed(10_000 + seed)
    starts = torch.randint(0, val.numel() - seq_len - 1, (count,), generator=generator)
    return torch.stack([val[s : s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def _eval_loss(model: TinyLlama, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-byte cross-entropy over the held-out windows."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start : start + batch_size]
        logits = model(chunk[:, :-1])
        total += (
            float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1)
                ).item()
            )
            * chunk.shape[0]
        )
    model.train(was_training)
    return total / windows.shape[0]


def train(
    out_dir: Path,
    *,
    steps: int = 60,
    save_every: int = 10,
    seed: int = 0,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    ffn: int = 344,
    seq_len: int = 64,
    batch_size: int = 16,
    lr: float = 3e-3,
    sleep: float = 0.0,
    warmup_steps: int = 0,
    grad_clip: float | None = None,
    weight_decay: float = 0.01,
    train_slice: int | None = None,
    val_bytes: int = 0,
    val_batches: int = 4,
    stop_on_nonfinite: bool = False,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> list[Path]:
    """Train the tiny model and save a checkpoint every ``save_every`` steps.

    Args:
        out_dir: run directory; ``checkpoint-<step>/`` folders are created inside it.
        steps: optimiser steps in total.
        save_every: checkpoint interval in steps (the last step is always saved).
        seed: makes the run deterministic (data order, initialisation).
        sleep: seconds to pause after each save, so a demo looks like a live run.
        warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr``
            over this many steps (0: constant from the first step).
        grad_clip: clip the gradients' global norm to this (None: no clipping).
        weight_decay: AdamW's decoupled weight decay.
        train_slice: draw every training window from the first ``train_slice`` bytes only
            (heavy repetition of a small slice); None: from the whole training part.
        val_bytes: hold out the corpus' last ``val_bytes`` bytes (never trained on) and log
            their loss as ``eval_loss`` at each save, as the Trainer logs its evaluation.
        val_batches: batches of held-out windows (fixed, seeded) behind each ``eval_loss``.
        stop_on_nonfinite: a non-finite training loss ends the run (the checkpoints before it
            stay) instead of raising.
        on_log: called with each ``log_history`` entry as it is made (the last one too, when a
            non-finite loss ends the run after the last save).

    Returns:
        The checkpoint folders written, in step order.

    Example:
        >>> train(Path("runs/demo"), steps=30, save_every=10)  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = load_corpus()
    val = data[data.numel() - val_bytes :] if val_bytes > 0 else None
    if val is not None:
        if val.numel() < seq_len + 2 or val_bytes >= data.numel() - seq_len - 2:
            raise ValueError(f"val_bytes {val_bytes} leaves no room for training or evaluation")
        data = data[: data.numel() - val_bytes]
    if train_slice is not None:
        if train_slice < seq_len + 2:
            raise ValueError(f"train_slice {train_slice} is shorter than one window")
        data = data[:train_slice]
    vocab = 256
    model = TinyLlama(vocab, d_model, n_layers, n_heads, ffn)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda i: min(1.0, (i + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )
    val_windows = _val_windows(val, seq_len, batch_size * val_batches, seed)
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d_model,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_heads,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "max_steps": steps,
        "seed": seed,
    }
    history: list[dict[str, float]] = []
    saved: list[Path] = []
    for step in range(1, steps + 1):
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimiser.step()
        schedule.step()
        value = float(loss.item())
        if not math.isfinite(value):
            if stop_on_nonfinite:
                history.append({"step": step, "loss": value})
                if on_log is not None:
                    on_log(history[-1])
                break
            raise RuntimeError(f"loss diverged at step {step}")
        history.append({"step": step, "loss": value})
        if on_log is not None:
            on_log(history[-1])
        if step % save_every == 0 or step == steps:
            if val_windows is not None:
                history.append(
                    {"step": step, "eval_loss": _eval_loss(model, val_windows, batch_size)}
                )
                if on_log is not None:
                    on_log(history[-1])
            saved.append(_save(model, out_dir, step, config, history))
            if sleep > 0:
                time.sleep(sleep)
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alphawatch.workers.demo_run",
        description="Train a tiny Llama-style model on stdlib source and write HF checkpoints.",
    )
    parser.add_argument("out_dir", type=Path, help="run directory to write checkpoint-<step>/ into")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.0, help="pause after each save (s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    paths = train(
        args.out_dir,
        steps=args.steps,
        save_every=args.save_every,
        seed=args.seed,
        d_model=args.d_model,
        n_layers=args.layers,
        sleep=args.sleep,
    )
    print(f"wrote {len(paths)} checkpoints to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
