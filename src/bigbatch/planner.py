"""Choose the micro-batch: the fastest that fits a memory budget, at a fixed global batch.

The global batch is the recipe's and never changes; only how it is cut does. The candidates are
the micro-batch sizes ``m`` that divide the per-rank batch ``global / world``, so
``K = global / (m × world)`` is a whole number. For each:

1. its peak memory is predicted from :func:`bigbatch.memory.measure_memory`'s line
   ``held + optimizer state to come + fixed + per_sample · m``, and it fits when that prediction,
   with the part above ``held`` enlarged by a safety ``margin``, is within the budget. The margin
   (default 30% on CPU, 10% on CUDA) covers what the probes cannot see: a CPU process's resident
   set keeps freed, fragmented heap (measured: training steps peaked up to about 1.3 times the
   probes' prediction above the bytes held), and the CUDA caching allocator fragments too;
2. those predicted to fit are timed (a forward and backward, median of a few), giving samples/s
   and tokens/s, and the time of a step's forward/backward work, ``K · t(m)``;
3. the choice is the fastest fitting candidate. Timings within ``tolerance`` of the fastest count as
   ties, which go to the larger micro-batch (fewer micro-batches per step, less per-step overhead).

A candidate predicted to fit that still runs out of memory while being timed is marked so and left
out. Nothing is changed in the model or optimizer (see :func:`~bigbatch.memory.measure_memory`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .distributed import world_size as default_world_size
from .memory import (
    MemoryBudgetError,
    MemoryProfile,
    default_budget,
    format_bytes,
    is_out_of_memory,
    measure_memory,
    parse_bytes,
    release_memory,
    time_micro_batch,
)
from .plan import BatchPlan

__all__ = ["Candidate", "MicroBatchChoice", "plan_micro_batch"]


@dataclass(frozen=True)
class Candidate:
    """One micro-batch size considered.

    Attributes:
        micro_batch, accum_steps: the size and the K it gives.
        predicted_bytes: predicted peak memory of a training step with it.
        fits: predicted within the budget (and did not run out of memory when timed).
        seconds: median seconds of one forward and backward (None: not timed).
        samples_per_s, tokens_per_s: throughput of the forward and backward (None: not timed).
        note: why it was not timed, if it was not.
    """

    micro_batch: int
    accum_steps: int
    predicted_bytes: int
    fits: bool
    seconds: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    note: str = ""

    @property
    def step_seconds(self) -> float | None:
        """Forward and backward time of one optimizer step: ``K · t(m)``."""
        return None if self.seconds is None else self.accum_steps * self.seconds


@dataclass(frozen=True)
class MicroBatchChoice:
    """What :func:`plan_micro_batch` chose, and the evidence."""

    plan: BatchPlan
    budget: int
    profile: MemoryProfile
    candidates: tuple[Candidate, ...]
    margin: float = 0.0

    @property
    def micro_batch(self) -> int:
        return self.plan.micro_batch

    @property
    def accum_steps(self) -> int:
        return self.plan.accum_steps

    def table(self) -> str:
        """The candidates as a markdown table, the chosen one marked."""
        rows = ["| micro-batch | K | predicted peak | fits | fwd+bwd s | samples/s | tokens/s "
                "| s per step |", "|---:|---:|---:|:---:|---:|---:|---:|---:|"]
        for c in self.candidates:
            mark = " ←" if c.micro_batch == self.micro_batch else ""
            timed = c.seconds is not None

            def num(x: float | None, fmt: str) -> str:
                return format(x, fmt) if x is not None else "—"

            rows.append(
                f"| {c.micro_batch}{mark} | {c.accum_steps} | {format_bytes(c.predicted_bytes)} "
                f"| {'yes' if c.fits else 'no'} | {num(c.seconds, '.4f')} "
                f"| {num(c.samples_per_s, ',.1f')} | {num(c.tokens_per_s, ',.0f')} "
                f"| {num(c.step_seconds, '.3f') if timed else c.note or '—'} |")
        return "\n".join(rows)

    def summary(self) -> str:
        """One paragraph: the memory line and the choice."""
        p = self.profile
        how = "measured peaks" if p.measured else "saved activations (no peak readable here)"
        return (
            f"memory line from {how}: held {format_bytes(p.held_bytes)} + optimizer state to "
            f"come {format_bytes(p.optimizer_pending)} + {format_bytes(p.fixed)} + "
            f"{format_bytes(p.per_sample)} per sample (of which activations saved for backward "
            f"{format_bytes(p.saved_per_sample)}); budget {format_bytes(self.budget)}, with a "
            f"{self.margin:.0%} safety margin on the bytes above those held.\n"
            f"chosen: micro-batch {self.micro_batch} × K {self.accum_steps}"
            + (f" × {self.plan.world_size} ranks" if self.plan.world_size > 1 else "")
            + f" = global batch {self.plan.global_batch}, predicted peak "
            f"{format_bytes(p.predict(self.micro_batch))}")


def plan_micro_batch(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], Any],
                     make_batch: Callable[[int], Any], *, global_batch: int,
                     optimizer: torch.optim.Optimizer | None = None,
                     world_size: int | None = None, budget: int | str | None = None,
                     candidates: Sequence[int] | None = None, repeats: int = 3,
                     tolerance: float = 0.03, margin: float | None = None,
                     autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                     ) -> MicroBatchChoice:
    """Pick the micro-batch size (and so K) for ``global_batch`` under a memory budget.

    Args:
        model: the model to train, on its device, holding no gradients.
        loss_fn: ``loss_fn(model, batch) -> LossSum``.
        make_batch: ``make_batch(m)`` returns a batch of ``m`` samples like training's (for
            padded data, at the longest length).
        global_batch: samples per optimizer step over all ranks (kept as it is).
        optimizer: the model's optimizer (its state counts towards the peak).
        world_size: data-parallel ranks (default: the torch.distributed world, else 1).
        budget: peak bytes a step may use (an int, or a size such as ``"8GiB"``); default 80% of
            what is free now plus what is held (CUDA: allocator bytes; CPU: the process's resident
            set and the system's available memory).
        candidates: sizes to consider (default: every divisor of ``global_batch / world_size``).
        repeats: timed forward/backward passes per candidate.
        tolerance: relative timing difference treated as a tie (ties go to the larger size).
        margin: safety margin on the predicted bytes above those held (default 0.3 on CPU, 0.1
            on CUDA; see the module docstring).
        autocast: the context the forward runs in (mixed precision), if any.

    Returns:
        :class:`MicroBatchChoice`.

    Raises:
        MemoryBudgetError: not even one sample per micro-batch fits the budget, a candidate does
            not divide the per-rank batch, or a size cannot be read.
        BatchPlanError: ``global_batch`` is not divisible by the world size.
    """
    world = default_world_size() if world_size is None else world_size
    local = BatchPlan(global_batch=global_batch, accum_steps=1, world_size=world).micro_batch
    device = next(model.parameters()).device
    limit = parse_bytes(budget) if budget is not None else default_budget(device)
    if margin is None:
        margin = 0.1 if device.type == "cuda" else 0.3
    if not 0 <= margin < 10:
        raise MemoryBudgetError(f"margin must be in [0, 10), got {margin}")
    sizes = sorted(set(candidates)) if candidates else _divisors(local)
    bad = [m for m in sizes if m < 1 or local % m]
    if bad:
        raise MemoryBudgetError(f"candidate micro-batch sizes {bad} do not divide the per-rank "
                                f"batch {local} (global {global_batch} / {world} ranks)")
    first = measure_memory(model, loss_fn, make_batch, optimizer=optimizer, sizes=(1, 2),
                           autocast=autocast)

    def with_margin(profile: MemoryProfile, m: int) -> int:
        return int(profile.held_bytes + (profile.predict(m) - profile.held_bytes) * (1 + margin))

    # A third probe at a size well inside the budget pins the slope where it matters.
    room = (limit - first.held_bytes) / (1 + margin) + first.held_bytes
    third = min(local, first.largest_fitting(int(room)) // 2)
    profile = first
    if third > 2:
        profile = measure_memory(model, loss_fn, make_batch, optimizer=optimizer,
                                 sizes=(1, 2, third), autocast=autocast)
    if with_margin(profile, 1) > limit:
        raise MemoryBudgetError(
            f"even a micro-batch of 1 sample is predicted to need "
            f"{format_bytes(with_margin(profile, 1))} (with a {margin:.0%} margin), over the "
            f"budget of {format_bytes(limit)}; "
            "raise the budget (--memory), or turn on activation checkpointing, bf16, shorter "
            "sequences or a smaller model")
    rows: list[Candidate] = []
    for m in sizes:
        k = local // m
        predicted = profile.predict(m)
        if with_margin(profile, m) > limit:
            rows.append(Candidate(m, k, predicted, False, note="over budget"))
            continue
        try:
            seconds, items = time_micro_batch(model, loss_fn, make_batch(m), repeats=repeats,
                                              autocast=autocast)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            seconds = math.nan
        if math.isnan(seconds):
            model.zero_grad(set_to_none=True)
            release_memory(device)
            rows.append(Candidate(m, k, predicted, False, note="out of memory"))
            continue
        rows.append(Candidate(m, k, predicted, True, seconds, m / seconds, items / seconds))
    timed = [c for c in rows if c.fits]
    if not timed:
        raise MemoryBudgetError(f"no micro-batch size ran within the budget of "
                                f"{format_bytes(limit)}; raise it (--memory)")
    fastest = min(c.step_seconds for c in timed)  # type: ignore[type-var]
    chosen = max((c for c in timed if c.step_seconds <= fastest * (1 + tolerance)),  # type: ignore[operator]
                 key=lambda c: c.micro_batch)
    plan = BatchPlan(global_batch=global_batch, micro_batch=chosen.micro_batch, world_size=world)
    return MicroBatchChoice(plan=plan, budget=limit, profile=profile, candidates=tuple(rows),
                            margin=margin)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
