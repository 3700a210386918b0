"""Real training runs that write real checkpoints with optimizer state: a Hugging Face Trainer,
a Lightning loop, a MatFormer-style nested Llama. Tiny models from configs, nothing downloaded."""

from __future__ import annotations

import logging
import random
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB, HIDDEN, INTERMEDIATE, LAYERS = 96, 48, 128, 2


def llama_config(**extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **extra,
    )


def _samples(n: int, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(VOCAB) for _ in range(16)]
        out.append({"input_ids": ids, "labels": ids})
    return out


def trainer_run(
    out: Path,
    *,
    steps: int = 4,
    weight_decay: float = 0.01,
    seed: int = 0,
    save_every: int | None = None,
    **config: Any,
) -> tuple[Path, Any]:
    """A real ``transformers.Trainer`` run of a tiny Llama: its last checkpoint and the trainer
    (whose optimizer still holds the state that checkpoint saved)."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**config))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_every or steps,
        save_strategy="steps",
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=weight_decay,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=_samples(32, seed))
        trainer.train()
    return out / f"checkpoint-{steps}", trainer


def permute_mlp(model: nn.Module, seed: int) -> None:
    """Permute every MLP's intermediate neurons consistently: gate and up rows, down columns.

    The function the model computes is unchanged (MatFormer's reordering by importance).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:  # type: ignore[union-attr]
            mlp = layer.mlp
            order = torch.randperm(mlp.gate_proj.weight.shape[0], generator=g)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[order])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[order])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])


def nested_run(out: Path, widths: list[int], *, steps: int = 6, seed: int = 0) -> Path:
    """A MatFormer-style nested Llama: neurons permuted, then each step trains a random width.

    The MLP of a step keeps the first k neurons (gate/up rows, down columns), the rest of the
    model is shared; checkpoints are saved with ``save_pretrained`` and the widths in config.json
    under ``nested_widths``. Returns the folder of the last checkpoint.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(nested_widths=widths))
    permute_mlp(model, seed)
    choices = [*widths, INTERMEDIATE]
    rng = random.Random(seed)

    def sliced(mlp: nn.Module, width_of: list[int]) -> Any:
        def forward(x: torch.Tensor) -> torch.Tensor:
            k = width_of[0]
            gate = nn.functional.linear(x, mlp.gate_proj.weight[:k])
            up = nn.functional.linear(x, mlp.up_proj.weight[:k])
            return nn.functional.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, :k])

        return forward

    width_of = [INTERMEDIATE]
    for layer in model.model.layers:
        layer.mlp.forward = sliced(layer.mlp, width_of)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = _samples(steps * 4, seed)
    last = out
    for step in range(1, steps + 1):
        width_of[0] = rng.choice(choices)
        batch = data[(step - 1) * 4 : step * 4]
        ids = torch.tensor([b["input_ids"] for b in batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 3 == 0:
            last = out / f"checkpoint-{step}"
            model.save_pretrained(last)
    return last


def lightning_run(out: Path, *, steps: int = 3, seed: int = 0, groups: int = 1) -> tuple[Path, Any]:
    """A real Lightning run of a tiny Llama: the ``.ckpt`` it saved and the trainer."""
    import lightning as L
    from torch.utils.data import DataLoader
    from transformers import LlamaForCausalLM

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(llama_config())

        def training_step(self, batch: torch.Tensor, _index: int) -> torch.Tensor:
            loss: torch.Tensor = self.model(input_ids=batch, labels=batch).loss
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if groups == 1:
                return torch.optim.AdamW(self.parameters(), lr=1e-2)
            matrices = [p for p in self.parameters() if p.dim() == 2]
            vectors = [p for p in self.parameters() if p.dim() != 2]
            return torch.optim.AdamW(
                [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], lr=1e-2
            )

    torch.manual_seed(seed)
    data = torch.tensor([s["input_ids"] for s in _samples(steps * 4, seed)])
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), DataLoader(data, batch_size=4))  # type: ignore[arg-type]
    path = out / f"step={steps}.ckpt"
    trainer.save_checkpoint(path)
    return path, trainer
