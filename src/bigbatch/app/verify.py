"""``bigbatch verify``'s inputs: a workload's first global batches, or the user's own setup.

The comparison itself is the library's :func:`bigbatch.verify.verify`; this module builds what it
compares — the run's model (the built-in GPT or a Hugging Face folder) on its first global batches
(plain-text windows made variable-length), or the ``(model, batch, loss_fn)`` a
``--model module:function`` factory returns — and the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..batching import batch_rows, take_rows
from ..engine import LossFn
from .config import ConfigError, TrainConfig
from .data import TokenWindows, global_batches, vary_lengths
from .models.factory import load_factory
from .workload import apply_batchnorm_option, build_workload, to_dtype

__all__ = ["default_verify_inputs", "factory_verify_inputs"]

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]
VerifyInputs = tuple[torch.nn.Module, list[Any], LossFn, MakeOptimizer]


def default_verify_inputs(config: TrainConfig, steps: int) -> VerifyInputs:
    """The run's model and its first ``steps`` global batches.

    Batches are the training run's first ``steps`` global batches (:func:`global_batches`);
    plain-text windows are cut by :func:`vary_lengths` so micro-batch token counts differ
    (records — prompts, chats, classes — differ in length already), on the workload's device.

    Returns:
        ``(model, batches, loss_fn, make_optimizer)``; the optimizer is SGD with momentum at
        ``--lr`` (see :func:`_sgd` for why not AdamW).

    Raises:
        ConfigError, DataError: the device, the model or the data cannot be had, or the task is
            contrastive (its loss is not a sum over micro-batches; ``contrastive_step`` is tested
            apart).
    """
    if config.model.task == "contrastive":
        raise ConfigError("verify compares a loss that is a sum over micro-batches; the "
                          "contrastive loss spans the whole batch (its exactness is tested with "
                          "bigbatch.contrastive_step); use --task causal-lm or classify")
    work = build_workload(config)
    plan = config.plan()
    seed = config.runtime.seed
    order = global_batches(len(work.train), plan.global_batch, seed)
    windows = isinstance(work.train, TokenWindows)
    batches = [work.to_device(vary_lengths(work.train.batch(next(order)), seed, step) if windows
                              else work.train.batch(next(order))) for step in range(steps)]
    return work.model, batches, work.loss, _sgd(config.optim.lr)


def _sgd(lr: float) -> MakeOptimizer:
    """SGD with momentum: verify's optimizer, for the default model and for user factories.

    With SGD a parameter difference is proportional to the gradient difference, so it measures
    the accumulation. Adam divides each gradient element by its own magnitude: rounding noise in
    an element that is near zero becomes a step of size lr (measured on the default model in
    float32: gradients agree to ~1e-6 relative while AdamW parameters differ by ~5e-4).
    """

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    return make


def factory_verify_inputs(spec: str, config: TrainConfig) -> VerifyInputs:
    """A user's ``(model, batch, loss_fn)`` and SGD with momentum. A batch of exactly one global
    batch's rows is used at every step; a larger one is a dataset, and each step takes the next
    global batch of its rows in ``bigbatch train``'s order."""
    model, batch, loss_fn = load_factory(spec)
    dtype = {"float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16}[config.model.dtype]
    model = apply_batchnorm_option(model.to(dtype), config.model.batchnorm)
    batch, g = to_dtype(batch, dtype), config.plan().global_batch
    rows = batch_rows(batch) or 0
    if rows <= g:
        batches = [batch] * config.optim.steps
    else:
        order = global_batches(rows, g, config.runtime.seed)
        batches = [take_rows(batch, next(order)) for _ in range(config.optim.steps)]
    return model, batches, loss_fn, _sgd(config.optim.lr)
