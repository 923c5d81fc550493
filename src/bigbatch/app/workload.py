"""A run's workload — model, data, task and loss — built from a :class:`TrainConfig`.

The model is the built-in byte-level GPT, a Hugging Face folder (:mod:`.models.hf`) or the
user's own ``module:function`` (:mod:`.models.factory`); the data come from :mod:`.data`; the
task's loss and metrics from :mod:`.tasks`. ``bigbatch train``, ``verify``, ``compare`` and
``plan`` all build here, so they train the same thing; evaluation, the optimizer, the schedule and
the micro-batch planner for a workload live here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..batchnorm import batchnorm_layers, convert_batchnorm
from ..engine import LossFn
from ..engine.precision import PrecisionPolicy
from ..memory import OutOfMemory, is_out_of_memory, release_memory
from ..planner import MicroBatchChoice, plan_micro_batch
from .config import DEFAULT_GLOBAL_BATCH, ConfigError, TrainConfig
from .data import eval_batches, global_batches
from .data.loading import Loaded, load_samples, split_rows
from .data.tokenize import ByteTokenizer, Tokenizer
from .launch import Ranks
from .models.factory import is_factory, load_factory
from .models.gpt import GPT, GPTConfig
from .models.hf import HFModel, is_model_folder, load_hf, load_hf_tokenizer, transformer_blocks
from .tasks import TASKS, Task, classify_loss, gpt_lm_loss, hf_lm_loss

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


lm_loss = gpt_lm_loss  # the built-in GPT's loss (tests replace it to inject faults)


@dataclass
class Workload:
    """A model on its device, its training and validation samples, its task and its loss.

    Attributes:
        model: the module trained (a Hugging Face model, the built-in GPT, or the user's).
        train, val: samples with ``len`` and ``batch(indices)`` (``lengths`` too when packable).
        task: what is learned (:mod:`.tasks`); ``loss`` its ``loss_fn(model, batch)``.
        kind: ``"gpt"``, ``"hf"`` or ``"factory"``.
        tokenizer: text ↔ ids (None for a factory's own data).
        blocks: the repeated blocks FSDP2 shards one by one.
        notes: lines for the log (records left out, …).
    """

    model: torch.nn.Module
    train: Any
    val: Any
    device: torch.device
    dtype: torch.dtype
    task: Task = TASKS["causal-lm"]
    loss: LossFn = gpt_lm_loss
    kind: str = "gpt"
    tokenizer: Tokenizer | None = None
    blocks: list[torch.nn.Module] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hf: HFModel | None = None
    labels: dict[str, int] = field(default_factory=dict)

    def to_device(self, batch: Any) -> Any:
        non_blocking = self.device.type == "cuda"
        return _map(batch, lambda t: t.to(self.device, non_blocking=non_blocking))


def _map(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def load_data(config: TrainConfig, tok: Tokenizer | None = None) -> Loaded:
    """The run's training and validation samples (raises DataError on bad data)."""
    d = config.data
    return load_samples(d.data, d.eval_data, task=config.model.task, tok=tok or ByteTokenizer(),
                        seq_len=d.seq_len, policy=d.on_bad_sample)


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


def build_workload(config: TrainConfig, data: Any = None) -> Workload:
    """Device, model and data for ``config`` (``data``: the built-in GPT's training and
    validation windows, already loaded).

    Raises:
        ConfigError, DataError: the device, the model or the data cannot be had.
    """
    device = resolve_device(config.runtime.device)
    dtype, spec = _DTYPES[config.model.dtype], config.model.model
    if config.model.builtin:
        loaded = None if data is not None else load_data(config)
        train, val = data if loaded is None else _pair(loaded)
        model = build_model(config, device)
        return Workload(model, train, val, device, dtype, loss=lm_loss, tokenizer=ByteTokenizer(),
                        blocks=list(model.blocks),
                        notes=list(loaded.notes) if loaded is not None else [])  # records left out
    if is_factory(spec):  # type: ignore[arg-type]
        if config.model.task != "causal-lm" or config.data.data is not None:
            raise ConfigError(f"--model {spec} brings its own data and loss; drop --task and "
                              "--data")
        torch.manual_seed(config.runtime.seed)
        model, rows, loss_fn = load_factory(spec)  # type: ignore[arg-type]
        model = apply_batchnorm_option(model.to(device=device, dtype=dtype),
                                       config.model.batchnorm)
        train, val = split_rows(to_dtype(rows, dtype))
        return Workload(model, train, val, device, dtype, loss=loss_fn, kind="factory",
                        task=replace(TASKS["causal-lm"], unit="items"))
    if not is_model_folder(spec):  # type: ignore[arg-type]
        raise ConfigError(f"--model {spec}: no such folder; give a Hugging Face model folder "
                          "(config.json, weights, tokenizer) or MODULE:FUNCTION")
    task, shape = TASKS[config.model.task], config.model
    probe = load_hf_tokenizer(spec)  # type: ignore[arg-type]
    loaded = load_data(config, probe)
    torch.manual_seed(config.runtime.seed)  # a new head (classify) or adapters start from it
    hf = load_hf(spec, task=task.name, seq_len=config.data.seq_len, dtype=dtype,  # type: ignore[arg-type]
                 num_labels=len(loaded.labels), lora=shape.lora, lora_alpha=shape.lora_alpha,
                 lora_targets=shape.lora_targets, lora_dropout=shape.lora_dropout,
                 checkpoint_activations=shape.checkpoint_activations)
    model = apply_batchnorm_option(hf.model.to(device), shape.batchnorm)
    if task.name == "classify":
        loaded.notes.append(f"a new classification head for {len(loaded.labels)} classes "
                            f"({', '.join(loaded.labels)}), initialized from --seed "
                            f"{config.runtime.seed}")
    loss = {"causal-lm": hf_lm_loss, "classify": classify_loss}.get(task.name, hf_lm_loss)
    return Workload(model, loaded.train, loaded.val, device, dtype, task=task, loss=loss,
                    kind="hf", tokenizer=probe, blocks=transformer_blocks(model),
                    notes=loaded.notes, hf=hf, labels=loaded.labels)


def fresh_model(work: Workload, config: TrainConfig) -> torch.nn.Module:
    """A new copy of the workload's model on the CPU (to receive gathered FSDP2 weights)."""
    cpu = config.replace(device="cpu")
    if work.kind == "gpt":
        return build_model(cpu, torch.device("cpu"))
    if work.kind == "factory":
        return load_factory(config.model.model)[0]  # type: ignore[arg-type]
    shape = config.model
    return load_hf(shape.model, task=work.task.name, seq_len=config.data.seq_len,  # type: ignore[arg-type]
                   dtype=work.dtype, num_labels=len(work.labels), lora=shape.lora,
                   lora_alpha=shape.lora_alpha, lora_targets=shape.lora_targets,
                   lora_dropout=shape.lora_dropout).model


def _pair(loaded: Loaded) -> tuple[Any, Any]:
    return loaded.train, loaded.val


def to_dtype(batch: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (nested) batch in ``dtype``; integer tensors and the rest unchanged."""
    return _map(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms or embeddings' positions)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups: list[dict[str, Any]] = [g for g in (
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": rest, "weight_decay": 0.0}) if g["params"]]
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


def evaluate(work: Workload, samples: int, batch_size: int,
             autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """The task's validation metrics over ``samples`` validation samples spread evenly over the
    set: ``val_loss`` (the exact mean over every item they hold), ``val_items`` and the task's
    own (accuracy; recall@1 and MRR). A batch that runs out of memory halves the batch size and
    starts over.

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
                batches = [work.to_device(work.val.batch(chosen[idx]))
                           for idx in eval_batches(len(chosen), batch_size)]
                return work.task.metrics(work.model, batches, work.loss, autocast)
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


def plan_workload(config: TrainConfig, work: Workload, *, world_size: int = 1,
                  candidates: Sequence[int] | None = None, repeats: int = 3) -> MicroBatchChoice:
    """:func:`~bigbatch.plan_micro_batch` for this workload: its model, loss, optimizer,
    precision and first global batch, under ``--memory``."""
    g = config.batch.global_batch or DEFAULT_GLOBAL_BATCH
    rows = next(global_batches(len(work.train), g, config.runtime.seed))

    def make_batch(m: int) -> Any:
        return work.to_device(work.train.batch(rows[:m]))

    precision = PrecisionPolicy(config.runtime.precision, work.model, work.device)
    return plan_micro_batch(work.model, work.loss, make_batch, global_batch=g,
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
