"""K micro-batches through the engine against the full batch in one pass (``bigbatch verify``).

From one starting state, each optimizer step is taken twice — once with the whole global batch in a
single forward/backward (``∇(sum / count)``), once with the batch split into K micro-batches through
the :class:`~bigbatch.Accumulator` — and the gradients the two optimizers receive and the parameters
they produce are compared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .batching import batch_rows
from .engine import Accumulator, LossFn
from .errors import BigBatchError
from .loss import LossSum
from .plan import BatchPlan

__all__ = ["VerifyError", "VerifyReport", "VerifyRow", "default_rtol", "format_table",
           "naive_loss", "verify"]

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]


class VerifyError(BigBatchError):
    """A verification that cannot be run as asked (the message says why and what to give)."""


def naive_loss(loss_fn: LossFn) -> LossFn:
    """The pre-2024 recipe, run through the same engine: each micro-batch's own mean, over K.

    Returns ``LossSum(sum_k / count_k, 1)``: the engine then divides by Σ 1 = K, giving
    ``(1/K) Σ_k mean_k`` — a micro-batch with 1 real token weighs as much as one with 4,000.
    """

    def naive(model: torch.nn.Module, batch: Any) -> LossSum:
        ls = loss_fn(model, batch)
        count = ls.count.clamp(min=1) if isinstance(ls.count, torch.Tensor) else max(ls.count, 1)
        return LossSum(ls.sum / count, 1)

    return naive


@dataclass(frozen=True)
class VerifyRow:
    """Differences at one optimizer step (full batch is the reference)."""

    step: int
    loss_full: float
    loss_accum: float
    loss_diff: float
    grad_max_abs: float
    grad_max_rel: float
    param_max_rel: float
    cosine: float


@dataclass(frozen=True)
class VerifyReport:
    """One verify run: its rows, its setting, and the verdict (``worst <= rtol``)."""

    rows: list[VerifyRow]
    dtype: str
    global_batch: int
    micro_batch: int
    k: int
    rtol: float
    normalization: str

    @property
    def worst(self) -> float:
        """Largest relative gradient or parameter difference over all steps."""
        return max(max(r.grad_max_rel, r.param_max_rel) for r in self.rows)

    @property
    def passed(self) -> bool:
        """True when every step's relative differences are within ``rtol``."""
        return self.worst <= self.rtol


def default_rtol(dtype: torch.dtype) -> float:
    """The pass threshold for ``verify`` with parameters in ``dtype``.

    Measured on the default workload (``bigbatch verify``: SGD with momentum, clip 1, 3 steps of
    padded batches): the exact engine's worst relative difference is 3.7e-15 in float64 and
    1.4e-6 in float32 (at most 1.4e-6 over 10 steps, seeds 0-1, K = 2, 8, 32), the naive recipe's
    3.3e-2 to 1.6 in both. float32's 1e-4 sits ~70× above the first and ≥300× below the second.
    In bfloat16 rounding alone differs by ~0.3, as much as the naive recipe (~0.36): no threshold
    tells them apart.

    Returns:
        1e-10 for float64, 1e-4 for float32.

    Raises:
        VerifyError: any other dtype.
    """
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    raise VerifyError(f"verify has no meaningful tolerance for {dtype} parameters (rounding "
                      "alone is as large as the naive recipe's error); use --dtype float32 or "
                      "float64, or give --rtol")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖∞ / ‖b‖∞ (absolute when b is all zero)."""
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


class _GradCapture:
    """Clones every parameter's gradient just before the optimizer steps (public hook API)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.grads = [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for group in optimizer.param_groups for p in group["params"]
        ]


def verify(model: torch.nn.Module, batches: Sequence[Any], loss_fn: LossFn, *, plan: BatchPlan,
           make_optimizer: MakeOptimizer, rtol: float, clip: float | None = None,
           normalization: Literal["exact", "naive"] = "exact") -> VerifyReport:
    """Take one optimizer step per batch both ways from the same start and compare.

    Args:
        model: the starting state (left untouched; two copies are trained).
        batches: one global batch per optimizer step.
        loss_fn: ``loss_fn(model, batch) -> LossSum``.
        plan: how a global batch is split (``plan.split``) for the engine.
        make_optimizer: builds each copy's optimizer.
        rtol: pass when every relative gradient/parameter difference is at most this.
        clip: clip both paths' gradients to this norm.
        normalization: ``"naive"`` feeds the engine :func:`naive_loss` (to watch it fail).

    Returns:
        :class:`VerifyReport` with one row per step.

    Raises:
        VerifyError: ``normalization`` is unknown; a batch does not fill exactly
            ``plan.accum_steps`` micro-batches (the report would then claim a K it never ran);
            a batch holds no items; or the engine skipped a step (non-finite loss or gradient).
    """
    if normalization not in ("exact", "naive"):
        raise VerifyError(f"normalization must be 'exact' or 'naive', got {normalization!r}")
    full, acc_model = copy.deepcopy(model), copy.deepcopy(model)
    opt_full, opt_acc = make_optimizer(full), make_optimizer(acc_model)
    cap_full, cap_acc = _GradCapture(opt_full), _GradCapture(opt_acc)
    acc = Accumulator(acc_model, opt_acc, clip_grad_norm=clip)
    engine_loss = naive_loss(loss_fn) if normalization == "naive" else loss_fn
    rows = []
    for step, batch in enumerate(batches, 1):
        micro = plan.split(batch)
        n = sum(batch_rows(b) or 0 for b in micro)
        if n != plan.local_batch:
            raise VerifyError(
                f"verify: batch {step} has {n} rows but the plan takes {plan.local_batch} "
                f"(K={plan.accum_steps} micro-batches of {plan.micro_batch}); give a batch of "
                f"{plan.local_batch} rows, or --global-batch {n} and a --micro-batch dividing it"
            )
        opt_full.zero_grad(set_to_none=True)
        ls = loss_fn(full, batch)
        count = int(ls.count)
        if count == 0:
            raise VerifyError(f"verify: global batch {step} holds no items to normalize by")
        (ls.sum / count).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(full.parameters(), clip)
        opt_full.step()
        stats = acc.step(micro, engine_loss)
        loss_full = ls.sum.item() / count
        ga, gb = cap_acc.grads, cap_full.grads
        if stats.skipped or not ga:
            raise VerifyError(f"verify: the engine skipped step {step} ({stats.skip_reason})")
        flat_a, flat_b = torch.cat([g.flatten() for g in ga]), torch.cat([g.flatten() for g in gb])
        cosine = torch.nn.functional.cosine_similarity(flat_a.double(), flat_b.double(),
                                                       dim=0).item()
        rows.append(VerifyRow(
            step=step, loss_full=loss_full, loss_accum=stats.loss,
            loss_diff=abs(stats.loss - loss_full),
            grad_max_abs=max((a - b).abs().max().item() for a, b in zip(ga, gb)),
            grad_max_rel=max(_rel(a, b) for a, b in zip(ga, gb)),
            param_max_rel=max(_rel(a.detach(), b.detach())
                              for a, b in zip(acc_model.parameters(), full.parameters())),
            cosine=cosine,
        ))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VerifyReport(rows, dtype, plan.global_batch, plan.micro_batch, plan.accum_steps, rtol,
                        normalization)


def format_table(report: VerifyReport) -> str:
    """A fixed-width table, one row per step, and a PASS/FAIL line."""
    head = (f"{'step':>4}  {'loss (full)':>12}  {'loss diff':>9}  {'grad max abs':>12}  "
            f"{'grad max rel':>12}  {'param max rel':>13}  {'cosine':>18}")
    lines = [head, "-" * len(head)]
    for r in report.rows:
        lines.append(f"{r.step:>4}  {r.loss_full:>12.6f}  {r.loss_diff:>9.2e}  "
                     f"{r.grad_max_abs:>12.2e}  {r.grad_max_rel:>12.2e}  {r.param_max_rel:>13.2e}  "
                     f"{r.cosine:>18.15f}")
    verdict = "PASS" if report.passed else "FAIL"
    cmp = "<=" if report.passed else ">"
    lines.append(
        f"{verdict}: worst relative difference {report.worst:.2e} {cmp} rtol {report.rtol:.0e} "
        f"({report.dtype}, global batch {report.global_batch} = K={report.k} micro-batches of "
        f"{report.micro_batch}, {report.normalization} normalization)"
    )
    return "\n".join(lines)
