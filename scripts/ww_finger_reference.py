"""Reference values of weightwatcher 0.7.7's finger-robust fits, for tests/spectral/test_fingers.py.

weightwatcher applies ``fix_fingers`` only through the powerlaw package (``pl_package='powerlaw'``),
and that path fails under powerlaw 2.0.0 (every alpha -1). Run this script in an environment with
weightwatcher 0.7.7 and powerlaw 1.5, not alphawatch's own:

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 weightwatcher==0.7.7 powerlaw==1.5 safetensors
    .venv-ref/bin/python scripts/ww_finger_reference.py

It writes, under tests/data/fingers/:

* ``seeded.safetensors``: seeded matrices (Gaussian, Student-t, planted spikes that make fingers);
* ``llama_layer.safetensors``: one Llama-style decoder layer (attention q/k/v/o, SwiGLU
  gate/up/down) trained here for a few hundred steps on a synthetic task, saved in bfloat16
  under Hugging Face names, as a training run would;
* ``reference.json``: weightwatcher's alpha, D, xmin, tail size (and clipped fingers) of every
  matrix for ``fix_fingers='xmin_peak'``, ``fix_fingers='clip_xmax'`` and the plain fit, with
  the versions that produced them.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "fingers"
HIDDEN, INTER, HEADS = 128, 344, 4


def seeded_matrices() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    shapes = [(256, 128), (200, 200), (128, 320), (300, 150)]
    for i, (rows, cols) in enumerate(shapes):
        g = torch.Generator().manual_seed(100 + i)
        gauss = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
        torch.manual_seed(200 + i)
        heavy = torch.distributions.StudentT(torch.tensor(2.2)).sample((rows, cols))
        out[f"gaussian_{i}"] = gauss
        out[f"student_t_{i}"] = heavy / math.sqrt(cols)
        # A heavy tail plus a few planted outliers: the fingers fix_fingers is for.
        u = torch.randn(rows, 3, generator=g)
        v = torch.randn(3, cols, generator=g)
        strength = torch.tensor([30.0, 20.0, 12.0])
        out[f"fingers_{i}"] = (0.3 * heavy + gauss) / math.sqrt(2.0) + (
            u * strength
        ) @ v / math.sqrt(rows * cols)
    return {k: v.contiguous() for k, v in out.items()}


class Layer(nn.Module):
    """One Llama decoder layer without norms or rotary embeddings: enough for real weights."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        heads = [
            p(x).view(b, t, HEADS, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        ]
        att = nn.functional.scaled_dot_product_attention(*heads, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, HIDDEN))
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def trained_llama_layer() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer, embed, head = Layer(), nn.Embedding(64, HIDDEN), nn.Linear(HIDDEN, 64)
    params = [*layer.parameters(), *embed.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for _ in range(300):  # predict the token two places back: attention has to learn something
        tokens = torch.randint(0, 64, (16, 32))
        logits = head(layer(embed(tokens)))[:, 2:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, :-2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    prefix = "model.layers.0."
    names = {
        "q_proj": "self_attn.",
        "k_proj": "self_attn.",
        "v_proj": "self_attn.",
        "o_proj": "self_attn.",
        "gate_proj": "mlp.",
        "up_proj": "mlp.",
        "down_proj": "mlp.",
    }
    return {
        f"{prefix}{group}{name}.weight": getattr(layer, name)
        .weight.detach()
        .to(torch.bfloat16)
        .contiguous()
        for name, group in names.items()
    }


def ww_fit(weight: torch.Tensor, **options: object) -> dict[str, float]:
    import weightwatcher as ww

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.to(torch.float32).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=nn.Sequential(linear)).analyze(**options)
    row = frame.iloc[0]
    keys = ["alpha", "D", "xmin", "num_pl_spikes", "sigma"]
    keys += [k for k in ("num_fingers", "raw_alpha", "Lambda") if k in row]
    return {k: float(row[k]) for k in keys}


def main() -> None:
    import powerlaw
    import weightwatcher

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(seeded_matrices(), str(OUT / "seeded.safetensors"))
    save_file(
        trained_llama_layer(), str(OUT / "llama_layer.safetensors"), metadata={"format": "pt"}
    )
    options = {
        "ww": {},
        "xmin_peak": {"fix_fingers": "xmin_peak", "pl_package": "powerlaw"},
        "clip_xmax": {"fix_fingers": "clip_xmax", "pl_package": "powerlaw"},
    }
    files: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for file in ("seeded.safetensors", "llama_layer.safetensors"):
        tensors = load_file(str(OUT / file))  # read back: the values tests will read
        files[file] = {
            name: {m: ww_fit(t, **o) for m, o in options.items()}
            for name, t in sorted(tensors.items())
        }
        for name, fits in files[file].items():
            print(
                file,
                name,
                {m: round(f["alpha"], 4) for m, f in fits.items()},
                "fingers",
                fits["clip_xmax"].get("num_fingers"),
            )
    doc = {
        "versions": {
            "weightwatcher": weightwatcher.__version__,
            "powerlaw": getattr(powerlaw, "__version__", "1.5"),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "files": files,
    }
    (OUT / "reference.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
