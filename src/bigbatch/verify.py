"""K micro-batches through the engine against the full batch in one pass (``bigbatch verify``).

From one starting state, each optimizer step is taken twice — once with the whole global batch in a
single forward/backward (``∇(sum / count)``), once with the batch split into K micro-batches through
the :class:`~bigbatch.Accumulator` — and the gradients the two optimizers receive and the parameters
they produce are compared.

Both copies run with dropout off (:mod:`bigbatch.dropout`): a full batch and K micro-batches cannot
draw the same masks, and the comparison would measure the masks. Any randomness left is found by
its effect (two forwards of one batch under different seeds) and refused. With ``precision`` bf16
or fp16 both paths run under autocast, as ``bigbatch train`` does, and compare at the tolerance of
that precision (:func:`default_rtol`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .batching import batch_rows
from .dropout import switch_off_dropout
from .engine import Accumulator, LossFn
from .engine.precision import Precision
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
    precision: str = "fp32"
    dropout_off: tuple[str, ...] = ()  # what was switched off in both copies (switch_off_dropout)

    @property
    def worst(self) -> float:
        """Largest relative gradient or parameter difference over all steps."""
        return max(max(r.grad_max_rel, r.param_max_rel) for r in self.rows)

    @property
    def passed(self) -> bool:
        """True when every step's relative differences are within ``rtol``."""
        return self.worst <= self.rtol


def default_rtol(dtype: torch.dtype, precision: Precision = "fp32") -> float:
    """The pass threshold for ``verify`` with parameters in ``dtype`` under ``precision``.

    Measured on the default workload (``bigbatch verify``: SGD with momentum, clip 1, 3 steps of
    padded batches): the exact engine's worst relative difference is 3.7e-15 in float64 and
    1.4e-6 in float32 (at most 1.4e-6 over 10 steps, seeds 0-1, K = 2, 8, 32), the naive recipe's
    3.3e-2 to 1.6 in both. float32's 1e-4 sits ~70× above the first and ≥300× below the second.
    In bfloat16 rounding alone differs by ~0.3, as much as the naive recipe (~0.36): no threshold
    tells them apart.

    Under autocast (float32 parameters) each micro-batch's gradient is rounded to bf16/fp16 before
    it is added, the full batch's once, and the two paths' forwards round differently. Measured
    (SGD with momentum, clip 1): the exact engine's worst relative difference is 5.6e-3 in bf16
    on the default workload (K = 2 and 4) and up to 7.2e-2 on a 2-layer test transformer whose
    smallest gradients are mostly rounding; in fp16 9.6e-4 on the latter. The tolerances, 1e-1
    for bf16 and 1e-2 for fp16, sit above those. The naive recipe reaches 0.26-2.8 on uneven
    micro-batches and fails both, but on the default workload in bf16 it differs by 3.8e-2 and
    passes: under bf16 a PASS says the engine works within rounding; only float32 and float64
    tell exact from naive on every workload.

    Returns:
        1e-10 for float64, 1e-4 for float32; under autocast (float32 parameters) 1e-1 for bf16,
        1e-2 for fp16.

    Raises:
        VerifyError: any other dtype, or autocast with parameters that are not float32.
    """
    if precision in _AUTOCAST_RTOL:
        if dtype != torch.float32:
            raise VerifyError(f"verify has no default tolerance for --precision {precision} with "
                              f"{dtype} parameters; use --dtype float32 (as bigbatch train keeps "
                              "them), or give --rtol")
        return _AUTOCAST_RTOL[precision]
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-4
    raise VerifyError(f"verify has no meaningful tolerance for {dtype} parameters (rounding "
                      "alone is as large as the naive recipe's error); use --dtype float32 or "
                      "float64, or give --rtol")


_AUTOCAST_RTOL = {"bf16": 1e-1, "fp16": 1e-2}
_FP16_RETRIES = 24  # halvings of the loss scale an fp16 step may need (65536 → 1/256)
_AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
           normalization: Literal["exact", "naive"] = "exact",
           precision: Precision = "fp32") -> VerifyReport:
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
        precision: ``"bf16"`` / ``"fp16"``: both paths' forwards under autocast, as
            ``bigbatch train`` runs them (fp16 with a loss scaler on each path); float32
            parameters.

    Returns:
        :class:`VerifyReport` with one row per step; ``dropout_off`` says what dropout was
        switched off in both copies.

    Raises:
        VerifyError: ``normalization`` or ``precision`` is unknown, or autocast is asked for
            float64 parameters (autocast leaves float64 math alone); the forward is random with
            dropout off (two forwards of the first batch differ); a batch does not fill exactly
            ``plan.accum_steps`` micro-batches (the report would then claim a K it never ran);
            a batch holds no items; or either path skipped a step (non-finite loss or gradient).
    """
    if normalization not in ("exact", "naive"):
        raise VerifyError(f"normalization must be 'exact' or 'naive', got {normalization!r}")
    if precision not in _AUTOCAST_DTYPE:
        raise VerifyError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
    param = next(model.parameters())
    if precision != "fp32" and param.dtype == torch.float64:
        raise VerifyError(f"--precision {precision} autocasts float32 math; float64 parameters "
                          "stay float64 under autocast: give --dtype float32")
    full, acc_model = copy.deepcopy(model), copy.deepcopy(model)
    dropout_off = switch_off_dropout(full)
    switch_off_dropout(acc_model)
    amp = _autocast(param.device, precision)
    if batches:
        _refuse_randomness(full, model, batches[0], loss_fn, amp, rtol)
    opt_full, opt_acc = make_optimizer(full), make_optimizer(acc_model)
    cap_full, cap_acc = _GradCapture(opt_full), _GradCapture(opt_acc)
    scaler = torch.amp.GradScaler(param.device.type) if precision == "fp16" else None
    acc = Accumulator(acc_model, opt_acc, clip_grad_norm=clip, precision=precision)
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
        stats = acc.step(micro, engine_loss)
        for _ in range(_FP16_RETRIES):  # as in train, an overflow halves the scale; here the
            if stats.skip_reason != "fp16 overflow":  # same step is retried to stay aligned
                break
            stats = acc.step(micro, engine_loss)
        loss_full = _full_step(full, opt_full, batch, loss_fn, step, clip, amp, scaler)
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
    dtype = str(param.dtype).removeprefix("torch.")
    return VerifyReport(rows, dtype, plan.global_batch, plan.micro_batch, plan.accum_steps, rtol,
                        normalization, precision, tuple(dropout_off))


def _autocast(device: torch.device, precision: str) -> Callable[[], Any]:
    """The forward's context: ``torch.autocast`` in bf16/fp16, as the engine and ``train``."""
    dtype = _AUTOCAST_DTYPE[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _full_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any, loss_fn: LossFn,
               step: int, clip: float | None, amp: Callable[[], Any],
               scaler: torch.amp.GradScaler | None) -> float:
    """The reference: one forward and backward of the whole batch, ``∇(sum / count)``, clipped
    and stepped (fp16: scaled, unscaled before clipping). Returns the mean loss."""
    opt.zero_grad(set_to_none=True)
    with amp():
        ls = loss_fn(model, batch)
    count = int(ls.count)
    if count == 0:
        raise VerifyError(f"verify: global batch {step} holds no items to normalize by")
    loss = ls.sum / count
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(opt)
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                              if p.grad is not None])
        if not torch.isfinite(norm):
            raise VerifyError(f"verify: the full-batch step {step} overflowed in fp16 (loss "
                              f"scale {scaler.get_scale():g}); use --precision bf16")
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return ls.sum.item() / count


def _refuse_randomness(model: torch.nn.Module, start: torch.nn.Module, batch: Any,
                       loss_fn: LossFn, amp: Callable[[], Any], rtol: float) -> None:
    """Two forwards of ``batch`` under different seeds must give the same loss.

    Randomness other than dropout (noise layers, random masking, sampling) makes the full batch
    and K micro-batches differ whatever accumulation does. The forwards run without gradient and
    leave the global RNG as it was; ``model``'s buffers (BatchNorm statistics) are put back from
    ``start``. The threshold is ``rtol`` or 1e-6, the smaller: a deterministic forward repeats
    bit for bit.
    """
    device = next(model.parameters()).device
    devices = [] if device.type == "cpu" else [device]
    losses = []
    with torch.random.fork_rng(devices=devices, device_type=device.type), torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            with amp():
                ls = loss_fn(model, batch)
            losses.append(float(ls.sum) / max(int(ls.count), 1))
    with torch.no_grad():
        for mine, theirs in zip(model.buffers(), start.buffers()):
            mine.copy_(theirs)
    a, b = losses
    diff = abs(a - b) / max(abs(b), 1e-30)
    if diff > min(rtol, 1e-6):
        raise VerifyError(
            f"verify: the model's forward is random: the first batch's loss is {a:.6g} and "
            f"{b:.6g} under two seeds (relative difference {diff:.1e}) with dropout switched "
            "off, so the full batch and K micro-batches cannot be compared; make the forward "
            "deterministic for verify (switch off noise, random masking or sampling in "
            "training mode)")


def format_table(report: VerifyReport) -> str:
    """A fixed-width table, one row per step, a line naming the dropout switched off (if any),
    and a PASS/FAIL line stating the tolerance and the precision compared in."""
    head = (f"{'step':>4}  {'loss (full)':>12}  {'loss diff':>9}  {'grad max abs':>12}  "
            f"{'grad max rel':>12}  {'param max rel':>13}  {'cosine':>18}")
    lines = [head, "-" * len(head)]
    for r in report.rows:
        lines.append(f"{r.step:>4}  {r.loss_full:>12.6f}  {r.loss_diff:>9.2e}  "
                     f"{r.grad_max_abs:>12.2e}  {r.grad_max_rel:>12.2e}  {r.param_max_rel:>13.2e}  "
                     f"{r.cosine:>18.15f}")
    if report.dropout_off:
        lines.append("dropout switched off in both copies (a full batch and K micro-batches "
                     f"cannot draw the same masks): {'; '.join(report.dropout_off)}")
    verdict = "PASS" if report.passed else "FAIL"
    cmp = "<=" if report.passed else ">"
    amp = "" if report.precision == "fp32" else f" under {report.precision} autocast"
    lines.append(
        f"{verdict}: worst relative difference {report.worst:.2e} {cmp} rtol {report.rtol:.0e} "
        f"({report.dtype}{amp}, global batch {report.global_batch} = K={report.k} micro-batches of "
        f"{report.micro_batch}, {report.normalization} normalization)"
    )
    return "\n".join(lines)
