"""PEFT LoRA adapters: the update s·B·A of each adapted module, and W + s·B·A with the base."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workers.checkpoints.errors import CheckpointError
from workers.checkpoints.naming import classify
from workers.checkpoints.readers import iter_safetensors, iter_torch

if TYPE_CHECKING:
    from workers.checkpoints.layers import LayerMatrix

_LORA = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(module: str, patterns: dict[str, float], default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return float(value)
    return default


def _base_weights(config: dict[str, object], folder: Path) -> dict[str, torch.Tensor]:
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str):
        return {}
    base_dir = Path(base) if Path(base).is_absolute() else (folder / base)
    if not base_dir.is_dir():
        return {}
    from workers.checkpoints.layers import _raw_tensors

    return {k.removesuffix(".weight"): t.to(torch.float32)
            for k, t, _, _ in _raw_tensors(base_dir)}


def iter_lora(folder: Path) -> Iterator[LayerMatrix]:
    """Updates (kind ``lora_update``) and, when the base model is local, merged weights."""
    from workers.checkpoints.layers import LayerMatrix

    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(config_path, f"{config_path}: unreadable adapter config") from exc
    if config.get("use_dora"):
        raise CheckpointError(config_path, f"{config_path}: DoRA adapters are not supported yet "
                                           "(the magnitude vector changes the merged weight)")
    weights_file = folder / "adapter_model.safetensors"
    if weights_file.exists():
        tensors = {k: t for k, t, _ in iter_safetensors(weights_file)}
    elif (folder / "adapter_model.bin").exists():
        tensors = dict(iter_torch(folder / "adapter_model.bin"))
    else:
        raise CheckpointError(folder, f"{folder}: adapter_config.json without adapter weights")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    stored: dict[str, torch.dtype] = {}
    for key, tensor in tensors.items():
        match = _LORA.match(key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
            stored[match.group(1)] = tensor.dtype
    r_default = float(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    base = _base_weights(config, folder)
    for module, ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise CheckpointError(weights_file, f"{weights_file}: {module} lacks lora_A or lora_B")
        r = _pattern_value(module, config.get("rank_pattern") or {}, r_default)
        alpha = _pattern_value(module, config.get("alpha_pattern") or {}, alpha_default)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        update = scale * (ab["B"].to(torch.float32) @ ab["A"].to(torch.float32))
        if config.get("fan_in_fan_out"):
            update = update.T
        kind, block = classify(module)
        yield LayerMatrix(f"{module}.lora_update", "lora_update", block, update,
                          stored[module], str(weights_file))
        base_weight = base.get(module)
        if base_weight is not None and base_weight.shape == update.shape:
            yield LayerMatrix(module, kind, block, base_weight + update, stored[module],
                              str(weights_file))
