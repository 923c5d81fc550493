"""Exact accumulation with a DeepSpeed engine: :class:`ExactEngine`, and the batch triple.

The change to a DeepSpeed training loop (``engine.backward(loss)`` then ``engine.step()`` per
micro-batch)::

    exact = ExactEngine(engine)                                   # + after deepspeed.initialize
    for i, batch in enumerate(loader):
        logits = engine(batch["input_ids"])
        loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])   # a sum
        exact.backward(loss, last=i == len(loader) - 1)          # was engine.backward(loss)
        engine.step()

What DeepSpeed does alone: ``engine.backward`` divides every micro-batch's loss by
``gradient_accumulation_steps`` (each micro-batch's own mean weighs the same whatever its number
of real tokens), and its boundary counter runs across epochs, so an epoch's last, short cycle is
finished with the next epoch's first micro-batches. What :class:`ExactEngine` changes: it sets the
boundary itself (every ``gradient_accumulation_steps`` micro-batches, or at ``last=True``), hands
``engine.backward`` the micro-batch's ``c · sum`` and, after the boundary's backward (DeepSpeed has
averaged the gradient over the data-parallel ranks), divides the gradient by the cycle's item count
summed over micro-batches and ranks (:mod:`bigbatch.integrations._rule`). ``engine.step()`` then
clips (``gradient_clipping``), steps the optimizer and the scheduler as before.

Verified: ZeRO stage 0 in float32/float64 (gradients in ``.grad``), one process and two.
Refused: ZeRO stages 1-3 (their gradients live in DeepSpeed's own partitioned buffers), DeepSpeed's
fp16/bf16 optimizers, pipeline engines and ``managed_gradient_accumulation=false``.

:func:`deepspeed_batch_config` and :func:`plan_from_deepspeed_config` translate between a
:class:`~bigbatch.BatchPlan` and DeepSpeed's ``train_batch_size = train_micro_batch_size_per_gpu ×
gradient_accumulation_steps × world_size``, with bigbatch's messages for sizes that do not add up.
Importing this module does not import DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import BatchPlanError
from ..loss import LossSum
from ..plan import BatchPlan
from . import IntegrationError
from ._rule import CycleTotals, ExactCycle

__all__ = ["ExactEngine", "deepspeed_batch_config", "plan_from_deepspeed_config"]

_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_batch_config(plan: BatchPlan) -> dict[str, int]:
    """The DeepSpeed config entries of ``plan``: ``{"train_batch_size": global_batch,
    "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accum_steps}``
    (for ``plan.world_size`` data-parallel ranks)."""
    return dict(zip(_KEYS, (plan.global_batch, plan.micro_batch, plan.accum_steps)))


def plan_from_deepspeed_config(config: Mapping[str, Any],
                               world_size: int | None = None) -> BatchPlan:
    """The :class:`~bigbatch.BatchPlan` of a DeepSpeed config's batch triple.

    As DeepSpeed does, any two of ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and
    ``gradient_accumulation_steps`` determine the third; one alone implies
    ``gradient_accumulation_steps = 1``.

    Args:
        config: the DeepSpeed config (a dict, as given to ``deepspeed.initialize``).
        world_size: data-parallel ranks (default: the torch.distributed world, else 1).

    Raises:
        BatchPlanError: no size given, a size that is not a positive integer (``"auto"`` included:
            resolve it first), or three sizes that break the rule, with the numbers.
    """
    given = {k: config[k] for k in _KEYS if config.get(k) is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise BatchPlanError(f"DeepSpeed config {key} must be a positive integer, got "
                                 f"{value!r}; resolve it before building the plan")
    if not given:
        raise BatchPlanError(f"the DeepSpeed config gives none of {', '.join(_KEYS)}; give at "
                             "least train_micro_batch_size_per_gpu or train_batch_size")
    g, m, k = (given.get(key) for key in _KEYS)
    if len(given) == 1 and k is None:
        k = 1
    return BatchPlan(global_batch=g, micro_batch=m, accum_steps=k, world_size=world_size)


class ExactEngine:
    """Exact gradient accumulation around a DeepSpeed engine's ``backward``.

    Args:
        engine: what ``deepspeed.initialize`` returned first (a ``DeepSpeedEngine``).

    Raises:
        IntegrationError: ZeRO stage above 0, fp16/bf16, a pipeline engine, or
            ``managed_gradient_accumulation=false`` (see the module docstring).

    Attributes:
        loss: the exact mean loss of the last finished cycle, over every item of every
            micro-batch and rank (NaN before the first).
        count: the items that mean covers.
    """

    def __init__(self, engine: Any) -> None:
        fix = None
        if not hasattr(engine, "set_gradient_accumulation_boundary"):
            fix = (f"expected the DeepSpeedEngine from deepspeed.initialize, got "
                   f"{type(engine).__name__}")
        elif hasattr(engine, "train_batch"):
            fix = "pipeline engines run their own micro-batch schedule; use a plain engine"
        elif engine.zero_optimization_stage() != 0:
            fix = (f"ZeRO stage {engine.zero_optimization_stage()} keeps gradients in its own "
                   "partitioned buffers; use stage 0 or bigbatch.Accumulator with FSDP2")
        elif engine.fp16_enabled() or engine.bfloat16_enabled():
            fix = ("DeepSpeed's fp16/bf16 optimizers are not verified with it; train in fp32 "
                   "(or use bigbatch.Accumulator(precision='bf16'))")
        elif not getattr(engine, "managed_gradient_accumulation", lambda: True)():
            fix = "set managed_gradient_accumulation true (the default)"
        if fix:
            raise IntegrationError(f"ExactEngine: {fix}")
        self.engine = engine
        self._cycle = ExactCycle("ExactEngine.backward")
        self._micro = 0

    def backward(self, loss: LossSum, *, last: bool = False) -> None:
        """Backpropagate one micro-batch's loss sum; after the cycle's last one, normalize.

        The cycle ends after ``gradient_accumulation_steps`` micro-batches or at ``last=True``
        (the last micro-batch of an epoch: a short cycle, normalized by what it holds). Call
        ``engine.step()`` after each call, as with ``engine.backward``.

        Raises:
            LossError: ``loss`` is not a :class:`~bigbatch.LossSum` (a bare mean has no count).
        """
        engine = self.engine
        k = engine.gradient_accumulation_steps()
        boundary = last or self._micro + 1 >= k
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(self._cycle.scaled(loss, expected_micro=k, reduce_sum=self._reduce_sum))
        self._micro += 1
        if boundary:  # DeepSpeed averaged .grad over the data-parallel ranks in that backward
            self._micro = 0
            self._cycle.finish(engine.module.parameters(), divisor=k,
                               world=engine.dp_world_size, reduce_sum=self._reduce_sum)

    @property
    def last(self) -> CycleTotals:
        """``(loss, count)`` of the last finished cycle."""
        return self._cycle.last

    @property
    def loss(self) -> float:
        return self._cycle.last.loss

    @property
    def count(self) -> int:
        return self._cycle.last.count

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.engine.dp_world_size == 1:
            return t
        from deepspeed import comm

        t = t.to(self.engine.device)
        comm.all_reduce(t, op=comm.ReduceOp.SUM, group=self.engine.data_parallel_group)
        return t
