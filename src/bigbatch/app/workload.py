"""The default workload: a byte-level GPT on a text corpus, built from a :class:`TrainConfig`.

``bigbatch train``, ``verify`` and ``compare`` all build their model, data and loss here, so they
train the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..batchnorm import batchnorm_layers, convert_batchnorm
from ..loss import LossSum, token_cross_entropy
from .config import ConfigError, TrainConfig
from .data import TokenWindows, load_documents, split_documents
from .models.gpt import GPT, GPTConfig

__all__ = ["Workload", "apply_batchnorm_option", "build_workload", "lm_loss", "make_optimizer",
           "make_scheduler", "resolve_device"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must name an available device.

    Raises:
        ConfigError: unknown device name, or CUDA asked for and not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    """Summed next-byte cross-entropy over non-padding labels (labels are pre-shifted)."""
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


@dataclass
class Workload:
    """A model on its device plus the train/validation token windows."""

    model: GPT
    train: TokenWindows
    val: TokenWindows
    device: torch.device
    dtype: torch.dtype

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        return {k: v.to(self.device, non_blocking=non_blocking) for k, v in batch.items()}


def load_data(config: TrainConfig) -> tuple[TokenWindows, TokenWindows]:
    """Train and validation windows of the configured corpus (raises DataError on bad data)."""
    train_docs, val_docs = split_documents(load_documents(config.data))
    return TokenWindows(train_docs, config.seq_len), TokenWindows(val_docs, config.seq_len)


def build_model(config: TrainConfig, device: torch.device) -> GPT:
    """The config's GPT, initialized from ``config.seed``, on ``device`` in ``config.dtype``."""
    torch.manual_seed(config.seed)
    gpt = GPTConfig(seq_len=config.seq_len, n_layer=config.n_layer, n_head=config.n_head,
                    d_model=config.d_model, checkpoint_activations=config.checkpoint_activations)
    model = GPT(gpt).to(device=device, dtype=_DTYPES[config.dtype])
    apply_batchnorm_option(model, config.batchnorm)  # the GPT has none: checked all the same
    return model


def apply_batchnorm_option(model: torch.nn.Module, option: str) -> torch.nn.Module:
    """Apply ``--batchnorm`` to a model's BatchNorm layers (in place; see convert_batchnorm).

    ``convert``: GroupNorm; ``freeze``: FrozenBatchNorm; ``error``: refuse a model that has any;
    ``warn`` and ``pooled`` leave the layers as they are (the Accumulator warns, or pools their
    running statistics when given ``batchnorm="pooled"``).

    Returns:
        The model (a new module only when the model itself is a BatchNorm layer).

    Raises:
        ConfigError: ``error`` and the model has BatchNorm layers (the message names them).
    """
    names = [name for name, _ in batchnorm_layers(model)]
    if not names:
        return model
    if option == "error":
        shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
        raise ConfigError(
            f"--batchnorm error: the model has BatchNorm layers ({shown}), whose statistics "
            "span one micro-batch under accumulation; use --batchnorm convert, freeze or pooled, "
            "or warn to train it anyway")
    if option in ("convert", "freeze"):
        return convert_batchnorm(model, to="group" if option == "convert" else "freeze")
    return model


def build_workload(config: TrainConfig, data: tuple[TokenWindows, TokenWindows] | None = None,
                   ) -> Workload:
    """Device, data (unless given) and a freshly initialized model for ``config``."""
    device = resolve_device(config.device)
    train, val = data if data is not None else load_data(config)
    model = build_model(config, device)
    return Workload(model, train, val, device, _DTYPES[config.dtype])


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings' positions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` optimizer steps, then constant or cosine to 10% of peak."""
    warmup, steps, cosine = config.warmup, config.steps, config.schedule == "cosine"

    def factor(step: int) -> float:  # ``step`` counts optimizer steps taken
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
