"""The gradient noise scale, measured for free from the two batch sizes accumulation already has.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", appendix A): for a mean
gradient ``g_B`` over B items drawn independently, ``E|g_B|² = |G|² + tr(Σ)/B``, with G the true
gradient and Σ the per-item gradient covariance. The *simple noise scale* ``B_simple = tr(Σ)/|G|²``
is the batch size at which gradient noise and signal are equal: well below it, a larger batch
makes each step nearly proportionally better; well above it, the extra items are mostly wasted.

A cycle gives both sizes. Each micro-batch k with ``B_k`` items yields ``|g_k|²`` (captured by
tensor hooks on the parameters, *before* autograd adds it to ``.grad``: no extra pass, no gradient
copy), and the cycle yields ``|g_N|²`` over all N items (the pre-clipping gradient norm). With
``s = mean_k |g_k|²`` and ``h = mean_k 1/B_k`` — the paper's equal-size formulas, generalized to
micro-batches of different sizes — the unbiased estimates are

    tr(Σ) ≈ S = (s − |g_N|²) / (h − 1/N),        |G|² ≈ G² = |g_N|² − S/N.

One step's estimate is very noisy (it can even be negative); :class:`NoiseScaleEMA` smooths the
numerator and the denominator separately, as the paper does, and divides. Needs at least two
micro-batches with items per cycle (over all ranks: under DDP each rank's micro-batch gradient,
taken before the all-reduce, is a small batch too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["MicroGradNorms", "NoiseEstimate", "NoiseScaleEMA", "estimate_noise"]


@dataclass(frozen=True)
class NoiseEstimate:
    """One cycle's unbiased estimates (per item: the loss is a mean over items).

    Attributes:
        grad_sq: ``|G|²`` estimate.
        trace: ``tr(Σ)`` estimate.
        small_batch: harmonic mean of the micro-batches' item counts, ``1/h``.
        big_batch: the cycle's item count N.
    """

    grad_sq: float
    trace: float
    small_batch: float
    big_batch: int

    @property
    def b_simple(self) -> float:
        """``tr(Σ)/|G|²`` of this cycle alone (noisy; NaN when |G|² ≤ 0)."""
        return self.trace / self.grad_sq if self.grad_sq > 0 else math.nan


def estimate_noise(small_sq_mean: float, inv_small_mean: float, big_sq: float,
                   big_batch: int) -> NoiseEstimate | None:
    """The estimates from ``s = mean_k |g_k|²``, ``h = mean_k 1/B_k``, ``|g_N|²`` and N.

    Returns:
        :class:`NoiseEstimate`, or None when the two sizes coincide (``h ≤ 1/N``: one
        micro-batch) or an input is not finite.
    """
    if big_batch <= 0 or not all(map(math.isfinite, (small_sq_mean, inv_small_mean, big_sq))):
        return None
    gap = inv_small_mean - 1.0 / big_batch
    if gap <= 1e-12 * inv_small_mean:
        return None
    trace = (small_sq_mean - big_sq) / gap
    return NoiseEstimate(grad_sq=big_sq - trace / big_batch, trace=trace,
                         small_batch=1.0 / inv_small_mean, big_batch=big_batch)


class MicroGradNorms:
    """Squared norms of each micro-batch's gradient contribution, via per-parameter tensor hooks.

    A tensor hook on a leaf sees the gradient flowing into it before ``AccumulateGrad`` adds it to
    ``.grad`` (and before DDP's all-reduce hook): exactly this micro-batch's, this rank's share.
    Everything stays on the device; the engine reads three numbers per cycle.
    """

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device) -> None:
        self.device = device
        self._handles = [p.register_hook(self._hook) for p in params if p.requires_grad]
        self.reset()

    def _hook(self, grad: torch.Tensor) -> None:
        # One reduction kernel in the gradient's own dtype (no float64 copy of the gradient);
        # the scalars are combined once per micro-batch in end_micro.
        low = grad.dtype in (torch.float16, torch.bfloat16)  # keep the sum of squares in float32
        self._norms.append(torch.linalg.vector_norm(grad.detach(),
                                                    dtype=torch.float32 if low else None))

    def end_micro(self, count: int | torch.Tensor, scale: float) -> None:
        """Close a micro-batch whose backward ran on ``scale × sum`` over ``count`` items."""
        if self._norms:
            norms = torch.stack([x.to(self.device, torch.float64) for x in self._norms])
            self._sq = torch.linalg.vector_norm(norms) ** 2
            self._norms.clear()
        n = torch.as_tensor(count, dtype=torch.float64, device=self.device)
        has = n > 0
        safe = torch.where(has, n, torch.ones_like(n))
        self._sums += torch.stack([torch.where(has, self._sq / (scale * safe) ** 2, 0.0),
                                   torch.where(has, 1.0 / safe, 0.0), has.double()])
        self._sq = torch.zeros((), dtype=torch.float64, device=self.device)

    def drop_micro(self) -> None:
        """Forget the norms of a micro-batch whose backward did not finish."""
        self._norms.clear()

    def local_sums(self) -> torch.Tensor:
        """``[Σ_k |g_k|², Σ_k 1/B_k, micro-batches with items]`` of this rank's cycle."""
        return self._sums

    def reset(self) -> None:
        self._norms: list[torch.Tensor] = []
        self._sq = torch.zeros((), dtype=torch.float64, device=self.device)
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def estimate(self, sums: torch.Tensor, big_sq: float, big_batch: int) -> NoiseEstimate | None:
        """The cycle's estimate from (all ranks') summed :meth:`local_sums`."""
        sq, inv, k = sums.tolist()
        if k < 2:
            return None
        return estimate_noise(sq / k, inv / k, big_sq, big_batch)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class NoiseScaleEMA:
    """``B_simple`` smoothed: exponential moving averages of ``tr(Σ)`` and ``|G|²`` kept apart.

    Both averages carry the same bias-correction factor, so their ratio needs none.

    Args:
        beta: weight of the past, in ``[0, 1)``; 0.95 averages over roughly the last 20 steps.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.trace = 0.0
        self.grad_sq = 0.0
        self.updates = 0

    def update(self, est: NoiseEstimate | None) -> float:
        """Fold in one cycle's estimate (None leaves it unchanged); returns :attr:`value`."""
        if est is not None and math.isfinite(est.trace) and math.isfinite(est.grad_sq):
            self.trace = self.beta * self.trace + (1 - self.beta) * est.trace
            self.grad_sq = self.beta * self.grad_sq + (1 - self.beta) * est.grad_sq
            self.updates += 1
        return self.value

    @property
    def value(self) -> float:
        """The smoothed ``B_simple`` in items; NaN before the first estimate or while ≤ 0."""
        if not self.updates or self.grad_sq <= 0 or self.trace <= 0:
            return math.nan
        return self.trace / self.grad_sq

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "trace": self.trace, "grad_sq": self.grad_sq,
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.trace = float(state["beta"]), float(state["trace"])
        self.grad_sq, self.updates = float(state["grad_sq"]), int(state["updates"])
