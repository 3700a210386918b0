"""LoRA adapters: the update s·B·A of each adapted module, and W + s·B·A with the base weights.

Two producers:

- PEFT adapter folders: ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern``, ``alpha_pattern``, ``fan_in_fan_out``) and ``adapter_model.safetensors`` (or
  ``.bin``) with ``…lora_A.weight`` (r, in) and ``…lora_B.weight`` (out, r). s = α/r, or α/√r
  with rsLoRA. The base weights come from ``base_model_name_or_path`` when it is a local folder,
  or from an explicit folder.
- SAT (SwissArmyTransformer) ``LoraLinear``: inside the model's own state dict,
  ``<module>.original.weight`` beside ``<module>.matrix_A.j`` (r, in) and ``<module>.matrix_B.j``
  (out_j, r) per partition j (Q, K, V of a fused projection); the update is the partitions'
  B_j·A_j stacked on the output dimension, s = lora_alpha / r (SAT's default α is 1).

DoRA (a learnt magnitude vector rescales every column of the merged weight) is refused until it
is supported, rather than analysed wrongly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError
from alphawatch.workers.checkpoints.files import LayerMatrix, make_layer, model_config, weight_files
from alphawatch.workers.checkpoints.fused import split_fused
from alphawatch.workers.checkpoints.naming import classify
from alphawatch.workers.checkpoints.readers import (
    iter_safetensors,
    iter_torch,
    read_safetensors_tensor,
    safetensors_header,
    scale_key_of,
    upcast,
)

if TYPE_CHECKING:
    import torch

_PEFT = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_SAT = re.compile(r"^(.+)\.(?:matrix_([AB])\.(\d+)|original\.weight)$")


def _pattern_value(module: str, patterns: object, default: float) -> float:
    """PEFT's rule: a pattern applies when it matches the end of the module's dotted name."""
    if not isinstance(patterns, dict):
        return default
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return default


class _BaseWeights:
    """The base model's weights by key, read one tensor at a time when asked for."""

    def __init__(self, folder: Path, confine: Confinement) -> None:
        self._confine = confine
        self.config = model_config(folder, confine)
        self._safetensors: dict[str, Path] = {}
        self._torch: dict[str, torch.Tensor] = {}
        for file in weight_files(folder, confine):
            if file.suffix == ".safetensors":
                _, header = safetensors_header(file, confine)
                self._safetensors.update(dict.fromkeys(header, file))
            else:
                self._torch.update(iter_torch(file, ("state_dict", "module", "model"), confine))

    def get(self, module: str) -> torch.Tensor | None:
        key = module + ".weight"
        if key in self._safetensors:
            stored, scale = read_safetensors_tensor(self._safetensors[key], key, self._confine)
            return upcast(stored, scale)
        tensor = self._torch.get(key)
        if tensor is None:
            return None
        scale_key = scale_key_of(key, self._torch)
        return upcast(tensor, None if scale_key is None else self._torch[scale_key])


def _adapter_config(folder: Path, confine: Confinement) -> dict[str, object]:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(confine.read_text(path, "adapter config"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"{path}: unreadable adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(path, f"{path}: adapter config is not a JSON object")
    if config.get("use_dora"):
        raise CheckpointError(
            path,
            f"{path}: DoRA adapters are not supported yet (the learnt "
            "magnitude vector changes the merged weight)",
        )
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(path, f"{path}: {peft_type} adapters are not supported (LoRA only)")
    return config


def _adapter_tensors(folder: Path, confine: Confinement) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = folder / "adapter_model.safetensors"
    if weights.exists():
        return weights, {k: t for k, t, _ in iter_safetensors(weights, confine=confine)}
    weights = folder / "adapter_model.bin"
    if weights.exists():
        return weights, dict(iter_torch(weights, confine=confine))
    raise CheckpointError(folder, f"{folder}: adapter_config.json without adapter weights")


def _base_folder(
    config: dict[str, object], folder: Path, base: Path | None, confine: Confinement
) -> Path | None:
    if base is not None:
        confine.check(base, "base model folder")
        if not Path(base).is_dir():
            raise CheckpointError(base, f"{base}: base model folder does not exist")
        return Path(base)
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named or "\x00" in named:
        return None
    candidate = Path(named) if Path(named).is_absolute() else folder / named
    # Checked before it is even looked at: whether a folder outside the roots exists is
    # itself something an adapter config must not be able to find out.
    confine.check(candidate, "PEFT base_model_name_or_path")
    return candidate if candidate.is_dir() else None


def iter_peft_lora(
    folder: Path, base: Path | None = None, confine: Confinement = UNCONFINED
) -> Iterator[LayerMatrix]:
    """Updates (kind ``lora_update``) and, when the base weights are found, merged weights.

    Raises:
        OutsideRootError: a file of the adapter, or the base model folder it names, resolves
            outside ``confine``'s roots.
    """
    config = _adapter_config(folder, confine)
    weights_file, tensors = _adapter_tensors(folder, confine)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT.match(key)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    if not pairs:
        raise CheckpointError(weights_file, f"{weights_file}: no lora_A/lora_B weights")
    base_dir = _base_folder(config, folder, base, confine)
    base_weights = _BaseWeights(base_dir, confine) if base_dir is not None else None
    r_default = float(config.get("r", 8))  # type: ignore[arg-type]
    alpha_default = float(config.get("lora_alpha", r_default))  # type: ignore[arg-type]
    for module, ab in sorted(pairs.items()):
        if "A" not in ab or "B" not in ab:
            raise CheckpointError(weights_file, f"{weights_file}: {module} lacks lora_A or lora_B")
        r = _pattern_value(module, config.get("rank_pattern"), r_default)
        alpha = _pattern_value(module, config.get("alpha_pattern"), alpha_default)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # B·A is (out, in) even for fan_in_fan_out (Conv1D) modules: PEFT transposes it only
        # to add it to the (in, out) stored weight. alphawatch's convention is (out, in).
        update = scale * (upcast(ab["B"]) @ upcast(ab["A"]))
        dtype = ab["A"].dtype
        yield make_layer(f"{module}.lora_update", update, dtype, str(weights_file))
        weight = base_weights.get(module) if base_weights is not None else None
        if weight is None:
            continue
        if config.get("fan_in_fan_out"):
            weight = weight.T
        if weight.shape != update.shape:
            raise CheckpointError(
                weights_file,
                f"{weights_file}: {module} update is "
                f"{tuple(update.shape)}, base weight {tuple(weight.shape)}",
            )
        merged = weight + update
        kind, _ = classify(module)
        assert base_weights is not None
        pieces = (
            split_fused(module, merged, base_weights.config)
            if kind == "qkv"
            else [(module, merged)]
        )
        for name, piece in pieces:
            yield make_layer(name, piece, dtype, str(weights_file))


class _SatModule:
    def __init__(self, file: str) -> None:
        self.file = file
        self.original: torch.Tensor | None = None
        self.parts: dict[str, dict[int, torch.Tensor]] = {"A": {}, "B": {}}

    def ready(self) -> bool:
        a, b = self.parts["A"], self.parts["B"]
        return self.original is not None and bool(a) and sorted(a) == sorted(b)


class SatLora:
    """Collects SAT ``LoraLinear`` tensors per module from a state-dict stream.

    ``model.state_dict()`` keeps a module's keys together, so a module is emitted as soon as a
    key of another module arrives and only its small A/B matrices and its original weight are
    held. Pieces of a module that arrive out of that order wait until the end of the stream.
    """

    def __init__(self, config: dict[str, object]) -> None:
        self._config = config
        alpha = config.get("lora_alpha", 1.0)
        self._alpha = float(alpha) if isinstance(alpha, int | float) else 1.0
        self._current: str | None = None
        self._modules: dict[str, _SatModule] = {}

    def takes(self, key: str) -> bool:
        return _SAT.match(key) is not None

    def add(
        self, key: str, tensor: torch.Tensor, file: str
    ) -> list[tuple[str, torch.Tensor, torch.dtype, str]]:
        match = _SAT.match(key)
        assert match is not None
        name = match.group(1).removeprefix("module.")
        done: list[tuple[str, torch.Tensor, torch.dtype, str]] = []
        if self._current is not None and name != self._current:
            previous = self._modules[self._current]
            if previous.ready():
                done = self._emit(self._current, self._modules.pop(self._current))
        self._current = name
        module = self._modules.setdefault(name, _SatModule(file))
        if match.group(2) is None:
            module.original = tensor
        else:
            module.parts[match.group(2)][int(match.group(3))] = tensor
        return done

    def finish(self) -> list[tuple[str, torch.Tensor, torch.dtype, str]]:
        out: list[tuple[str, torch.Tensor, torch.dtype, str]] = []
        for name in sorted(self._modules):
            out += self._emit(name, self._modules[name])
        self._modules.clear()
        self._current = None
        return out

    def _emit(
        self, name: str, module: _SatModule
    ) -> list[tuple[str, torch.Tensor, torch.dtype, str]]:
        import torch  # the merges are done in torch, as the pieces arrive (pickles, DCP)

        a, b, original, file = module.parts["A"], module.parts["B"], module.original, module.file
        if sorted(a) != sorted(b):
            raise CheckpointError(
                Path(file), f"{file}: {name} has matrix_A {sorted(a)} but matrix_B {sorted(b)}"
            )
        out: list[tuple[str, torch.Tensor, torch.dtype, str]] = []
        merged = None if original is None else upcast(original)
        if a:
            rank = a[0].shape[0]
            updates = [(self._alpha / rank) * (upcast(b[j]) @ upcast(a[j])) for j in sorted(a)]
            # A fused projection has one independent (A, B) pair per part (q, k, v, or k, v of
            # a key_value layer): each part's update is its own rank-r matrix, analysed alone.
            labels = "qkv"[-len(updates) :] if len(updates) in (2, 3) else ""
            if labels:
                out += [
                    (f"{name}.{label}.lora_update", update, a[0].dtype, file)
                    for label, update in zip(labels, updates, strict=True)
                ]
            else:
                out += [(f"{name}.lora_update", torch.cat(updates, dim=0), a[0].dtype, file)]
            if merged is not None:
                merged = merged + torch.cat(updates, dim=0)
        if merged is not None and original is not None:
            kind, _ = classify(name)
            pieces = split_fused(name, merged, self._config) if kind == "qkv" else [(name, merged)]
            out += [(piece_name, piece, original.dtype, file) for piece_name, piece in pieces]
        return out
