"""bigbatch's rule for a trainer that runs backward, clipping and the optimizer step itself.

The trainer keeps everything it owns: its backward (and loss scaling), its gradient sync, its
clipping, optimizer, scheduler, logging and checkpoints. The integration changes two things.

1. **What each micro-batch backpropagates**: ``c · sum_k`` instead of a mean. The trainer
   divides it by its own constant ``D`` (Accelerate's ``gradient_accumulation_steps``,
   Lightning's ``accumulate_grad_batches``, DeepSpeed's ``gradient_accumulation_steps``; 1 for
   the HF Trainer once its own division is off) and DDP averages over the ``W`` ranks, so after
   the cycle's last backward every rank holds

       G = c / (D · W) · Σ_ranks Σ_k ∇sum_k

2. **Once per optimizer step**, after that backward and before the trainer clips, the cycle's
   item count is summed over micro-batches and ranks (one small all-reduce, which also carries
   the loss sum), ``N = Σ count_k``, and the gradient is multiplied by ``D · W / (c · N)``:

       g = Σ_ranks Σ_k ∇sum_k / N

   the gradient of the mean loss over every item of the effective batch, also for a short last
   cycle (``N`` is what it holds; ``D`` is whatever the trainer divided by).

``c`` is a power of two near ``1 / N`` of the previous cycle (of the first micro-batch's count
times the expected micro-batches, summed over ranks, before any cycle was counted), the same on
every rank and for a whole cycle. It keeps gradients at the scale of a mean loss (fp16 loss
scaling stays in range), and since multiplying by a power of two is exact in floating point the
update does not depend on its value: a resumed run needs no saved ``c`` to continue bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from ..errors import LossError
from ..loss import LossSum, check_loss
from . import IntegrationError

__all__ = ["CycleTotals", "ExactCycle", "power_of_two_below"]

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def power_of_two_below(x: float) -> float:
    """``1 / 2^e`` with ``2^(e-1) <= x < 2^e``: a power-of-two stand-in for ``1 / x``, x >= 1."""
    _, e = math.frexp(max(float(x), 1.0))
    return math.ldexp(1.0, -e)


class CycleTotals(NamedTuple):
    """One finished cycle: the exact mean loss over its items (NaN without items) and their count,
    both summed over micro-batches and ranks."""

    loss: float
    count: int


class ExactCycle:
    """The bookkeeping of one cycle of micro-batches: prescale, loss sum and item count.

    Use: :meth:`scaled` on each micro-batch's :class:`~bigbatch.LossSum` (hand the result to the
    trainer's backward), then :meth:`finish` once, after the cycle's last backward and before
    clipping. ``what`` names the integration's call in error messages.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.prescale: float | None = None
        self.last = CycleTotals(math.nan, 0)
        self._reset()

    @property
    def micro_batches(self) -> int:
        """Micro-batches recorded in the cycle in flight."""
        return self._micro

    def scaled(self, loss: object, *, expected_micro: int = 1,
               reduce_sum: ReduceSum = _identity) -> torch.Tensor:
        """Record a micro-batch's sum and count; returns ``c · sum`` to backpropagate.

        Args:
            loss: the micro-batch's :class:`~bigbatch.LossSum`.
            expected_micro: micro-batches per cycle (only sizes the very first ``c``).
            reduce_sum: sums a small tensor over ranks; called on the first micro-batch of a run
                only, so that every rank starts with the same ``c``.

        Raises:
            LossError: ``loss`` is not a usable :class:`~bigbatch.LossSum` (a bare mean has no
                count to normalize by).
        """
        if not isinstance(loss, LossSum):
            raise LossError(
                f"{self.what} needs each micro-batch's bigbatch.LossSum(sum, count), got "
                f"{type(loss).__name__}: return the summed loss and its item count "
                "(bigbatch.token_cross_entropy, or LossSum.from_mean(mean, n_items))")
        ls = check_loss(loss)
        if self.prescale is None:
            estimate = torch.tensor([float(max(int(ls.count), 1) * max(expected_micro, 1))],
                                    dtype=torch.float64, device=ls.sum.device)
            self.prescale = power_of_two_below(float(reduce_sum(estimate)[0]))
        part = torch.stack([ls.sum.detach().to(torch.float64),
                            torch.as_tensor(ls.count, dtype=torch.float64, device=ls.sum.device)])
        self._totals = part if self._totals is None else self._totals + part.to(self._totals)
        self._micro += 1
        return ls.sum * self.prescale

    def finish(self, params: Iterable[torch.nn.Parameter], *, divisor: float, world: int,
               reduce_sum: ReduceSum = _identity) -> CycleTotals:
        """Normalize the accumulated gradient once: ``.grad ← .grad · D · W / (c · N)``.

        Args:
            params: the parameters whose ``.grad`` holds the cycle's accumulated gradient.
            divisor: ``D``, what the trainer divided each backpropagated loss by.
            world: ``W``, the ranks the gradient sync averaged over (1 without one).
            reduce_sum: sums a small tensor over the ``W`` ranks (identity for one process).

        Returns:
            :class:`CycleTotals` of the cycle (also kept as :attr:`last`).

        Raises:
            IntegrationError: no micro-batch of this cycle went through :meth:`scaled`.
        """
        if self._totals is None:
            raise IntegrationError(
                f"the optimizer is stepping but no micro-batch of this cycle went through "
                f"{self.what}: give it each micro-batch's bigbatch.LossSum")
        totals = reduce_sum(self._totals.clone())
        loss_sum, count = float(totals[0]), int(round(float(totals[1])))
        grads = [p.grad for p in params if p.grad is not None]
        assert self.prescale is not None  # set by the cycle's first scaled()
        if count == 0:
            warnings.warn("a cycle held no items (every label ignored): its gradient is set to "
                          "zero, but the trainer still steps (weight decay, momentum)",
                          stacklevel=3)
            if grads:
                torch._foreach_zero_(grads)
        elif grads:
            torch._foreach_mul_(grads, divisor * world / (self.prescale * count))
        self.prescale = power_of_two_below(max(count, 1))
        self.last = CycleTotals(loss_sum / count if count else math.nan, count)
        self._reset()
        return self.last

    def discard(self) -> None:
        """Forget the cycle in flight (its gradient is the trainer's to drop)."""
        self._reset()

    def state_dict(self) -> dict[str, float | None]:
        """The prescale (only gradient range depends on it, never the update)."""
        return {"prescale": self.prescale}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        prescale = state.get("prescale")
        self.prescale = None if prescale is None else float(prescale)
        self._reset()

    def _reset(self) -> None:
        self._totals: torch.Tensor | None = None
        self._micro = 0
