"""The default workload: a byte-level GPT on a text corpus, built from a :class:`TrainConfig`.

``bigbatch train``, ``verify``, ``compare`` and ``plan`` all build their model, data, loss and
optimizer here, so they train the same thing; evaluation and the micro-batch planner for it live
here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from ..batchnorm import batchnorm_layers, convert_batchnorm
from ..engine.precision import PrecisionPolicy
from ..loss import LossSum, token_cross_entropy
from ..memory import OutOfMemory, is_out_of_memory, release_memory
from ..planner import MicroBatchChoice, plan_micro_batch
from .config import DEFAULT_GLOBAL_BATCH, ConfigError, TrainConfig
from .data import TokenWindows, eval_batches, global_batches, load_documents, split_documents
from .launch import Ranks
from .models.gpt import GPT, GPTConfig

__all__ = ["Workload", "apply_batchnorm_option", "build_model", "build_workload",
           "choose_micro_batch", "evaluate", "lm_loss", "load_data",
           "make_optimizer", "make_scheduler", "plan_workload", "resolve_device"]

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
    train_docs, val_docs = split_documents(load_documents(config.data.data))
    seq = config.data.seq_len
    return TokenWindows(train_docs, seq), TokenWindows(val_docs, seq)


def build_model(config: TrainConfig, device: torch.device) -> GPT:
    """The config's GPT, initialized from ``config.seed``, on ``device`` in ``config.dtype``."""
    torch.manual_seed(config.runtime.seed)
    shape = config.model
    gpt = GPTConfig(seq_len=config.data.seq_len, n_layer=shape.n_layer, n_head=shape.n_head,
                    d_model=shape.d_model, checkpoint_activations=shape.checkpoint_activations)
    model = GPT(gpt).to(device=device, dtype=_DTYPES[shape.dtype])
    apply_batchnorm_option(model, shape.batchnorm)  # the GPT has none: checked all the same
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
    device = resolve_device(config.runtime.device)
    train, val = data if data is not None else load_data(config)
    model = build_model(config, device)
    return Workload(model, train, val, device, _DTYPES[config.model.dtype])


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings' positions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` optimizer steps, then constant or cosine to 10% of peak."""
    optim = config.optim
    warmup, steps, cosine = optim.warmup, optim.steps, optim.schedule == "cosine"

    def factor(step: int) -> float:  # ``step`` counts optimizer steps taken
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(work: Workload, samples: int, batch_size: int,
             autocast: Callable[[], AbstractContextManager]) -> tuple[float, int]:
    """Exact token-mean loss over ``samples`` validation samples spread evenly over the set, and
    the tokens it covers. A batch that runs out of memory halves the batch size and starts over.

    Raises:
        OutOfMemory: a single sample does not fit.
    """
    n = min(samples, len(work.val))
    chosen = torch.linspace(0, len(work.val) - 1, n).round().long().unique()
    was_training = work.model.training
    work.model.eval()
    try:
        while True:
            try:
                return _evaluate(work, chosen, batch_size, autocast)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                if batch_size == 1:
                    raise OutOfMemory(f"out of memory evaluating one sample ({err}); make one "
                                      "sample fit") from None
            release_memory(work.device)
            batch_size = (batch_size + 1) // 2
    finally:
        work.model.train(was_training)


def _evaluate(work: Workload, chosen: torch.Tensor, batch_size: int,
              autocast: Callable[[], AbstractContextManager]) -> tuple[float, int]:
    total = torch.zeros((), dtype=torch.float64, device=work.device)
    count = 0
    for idx in eval_batches(len(chosen), batch_size):
        batch = work.to_device(work.val.batch(chosen[idx]))
        with autocast():
            ls = lm_loss(work.model, batch)
        total += ls.sum.to(torch.float64)
        count += int(ls.count)
    return (float(total) / count if count else math.nan), count


def plan_workload(config: TrainConfig, work: Workload, *, world_size: int = 1,
                  candidates: Sequence[int] | None = None, repeats: int = 3) -> MicroBatchChoice:
    """:func:`~bigbatch.plan_micro_batch` for this workload: its model, loss, optimizer,
    precision and first global batch, under ``--memory``."""
    g = config.batch.global_batch or DEFAULT_GLOBAL_BATCH
    rows = next(global_batches(len(work.train), g, config.runtime.seed))

    def make_batch(m: int) -> dict[str, torch.Tensor]:
        return work.to_device(work.train.batch(rows[:m]))

    precision = PrecisionPolicy(config.runtime.precision, work.model, work.device)
    return plan_micro_batch(work.model, lm_loss, make_batch, global_batch=g,
                            optimizer=make_optimizer(work.model, config), world_size=world_size,
                            budget=config.batch.memory, candidates=candidates, repeats=repeats,
                            autocast=precision.autocast)


def choose_micro_batch(config: TrainConfig, work: Workload, ranks: Ranks, comm: torch.device,
                       ) -> tuple[TrainConfig, list[str]]:
    """Resolve ``--micro-batch auto``: plan on every rank, take the smallest choice; returns the
    config with it and the lines to show."""
    choice = ranks.together("planning the micro-batch", comm, lambda: plan_workload(
        config, work, world_size=ranks.world_size))
    micro = ranks.smallest(choice.micro_batch, comm)
    lines = ["--micro-batch auto: candidates (forward+backward timed on this machine)",
             choice.table(), choice.summary()]
    if micro != choice.micro_batch:
        lines.append(f"another rank has less memory: micro-batch {micro} on every rank")
    return config.replace(global_batch=choice.plan.global_batch, micro_batch=micro), lines
