"""The accumulation rule: one optimizer step over K micro-batches, exactly.

Each micro-batch's loss function returns a :class:`~bigbatch.LossSum`. Backward runs on the sum,
so the ``.grad`` buffers hold sums; once the cycle is complete (on every rank) the gradient is
divided by the cycle's total item count — once:

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)

the gradient of the mean loss over every item of the effective batch, whatever the padding of each
micro-batch, however many micro-batches the cycle holds and however the ranks share them. Then,
each exactly once per cycle and in this order: fp16 unscale, gradient norm, clipping,
``optimizer.step()``, ``scheduler.step()``, ``optimizer.zero_grad(set_to_none=True)``.

Numerical range: backward runs on ``c · sum_k`` with ``c = 1 / (previous cycle's item count)``, a
constant for the whole cycle, and the final division is by ``c · N``; the constant cancels exactly
in the mathematics and keeps gradients at the scale of a mean loss (fp16 would overflow on raw
sums). Before the first cycle has been counted, ``c = 1 / (count_1 × micro-batches expected)``.

What this module does not do is composed around it: the precision policy owns autocast, backward,
unscaling, clipping and stepping (:mod:`.precision`); the runner decides how a micro-batch is run,
whole or split on out-of-memory (:mod:`.runner`); the gradient sync decides which backward crosses
ranks (:mod:`.sync`); features ride along the cycle without touching the rule — the noise scale,
pooled BatchNorm (:mod:`.features`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any, Literal

import torch

from ..errors import BigBatchError, NonFiniteError
from ..loss import LossSum, check_loss
from .checks import as_cycle, check_args, refuse_gradless
from .features import BatchNormMode, make_features
from .precision import Precision, PrecisionPolicy
from .runner import OomMode, make_runner
from .stats import StepStats
from .sync import GradSync, SyncMode

__all__ = ["Accumulator", "LossFn"]

LossFn = Callable[[torch.nn.Module, Any], LossSum]
OnNonFinite = Literal["skip", "stop"]
_NONFINITE = ("non-finite loss", "non-finite gradient")


class Accumulator:
    """Runs one exact optimizer step over a cycle of micro-batches.

    Args:
        model: the module being trained (a DDP or FSDP2 module too).
        optimizer: its optimizer; stepped once per cycle.
        scheduler: optional learning-rate scheduler, stepped once per optimizer step taken.
        clip_grad_norm: clip the accumulated, normalized gradient to this L2 norm (as
            ``clip_grad_norm_``: ``coef = min(1, max_norm / (norm + 1e-6))``); None: off.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`bigbatch.engine.precision`).
        on_nonfinite: a NaN/inf loss or gradient ``"skip"``\\ s the step (weights, optimizer
            state and scheduler untouched) or ``"stop"``\\ s with :class:`NonFiniteError`
            (``"raise"`` is the same). fp16 overflow always skips and lowers the loss scale.
        sync: DDP/FSDP2 only: ``"cycle"`` syncs gradients once per step, ``"micro"`` after every
            micro-batch (FSDP2: sharded gradients only, less memory); see :mod:`.sync`.
        batchnorm: ``"warn"`` (a :class:`BatchNormWarning` naming BatchNorm layers), ``"ignore"``,
            or ``"pooled"``: one running-statistics update per step taken, from statistics pooled
            over the cycle (:class:`~bigbatch.PooledBatchNorm`).
        noise_scale: measure the gradient noise scale every cycle (``StepStats.noise``;
            :mod:`bigbatch.noise`). Not under FSDP2, whose sharding hides each rank's gradient.
        oom: a micro-batch that runs out of memory is ``"split"`` in halves (the step unchanged;
            later ones run in pieces of ``max_rows``, growing back after ``oom_regrow_after``
            clean steps), or ``"stop"``\\ s the cycle with the error (``"raise"`` is the same);
            ``"auto"``: split where the process group allows it (not FSDP2, not DDP broadcasting
            buffers). Splitting syncs DDP gradients in :meth:`finish`, not overlapped with the
            backward. See :mod:`.runner`.
        oom_regrow_after: clean optimizer steps before a split size is doubled again.

    Raises:
        BigBatchError: an argument is out of range (see the message).

    The engine owns ``.grad`` while a cycle runs: it starts each cycle from no gradient and leaves
    none behind.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 scheduler: Any | None = None, clip_grad_norm: float | None = None,
                 precision: Precision = "fp32", on_nonfinite: OnNonFinite = "skip",
                 sync: SyncMode = "cycle", batchnorm: BatchNormMode = "warn",
                 noise_scale: bool = False, oom: OomMode = "auto",
                 oom_regrow_after: int = 100) -> None:
        self.device = check_args(model, optimizer, clip_grad_norm, on_nonfinite)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.on_nonfinite = "stop" if on_nonfinite == "raise" else on_nonfinite
        self.precision = PrecisionPolicy(precision, model, self.device)
        self.sync = GradSync(model, sync)
        self.features = make_features(model, self.device, self.sync.kind, noise_scale=noise_scale,
                                      batchnorm=batchnorm)
        self.runner = make_runner(oom, oom_regrow_after, model=model, device=self.device,
                                  sync_kind=self.sync.kind, run_micro=self._run_micro,
                                  features=self.features)
        self.steps_taken = self.steps_skipped = 0
        self._prescale: float | None = None  # c, see the module docstring
        self._expected_micro = 1
        self._reset_cycle()

    # -- the cycle ---------------------------------------------------------------------------

    def step(self, micro_batches: Iterable[Any], loss_fn: LossFn) -> StepStats:
        """Accumulate every micro-batch of one cycle, then take one optimizer step.

        Args:
            micro_batches: the cycle's micro-batches, read one at a time (a list, or any iterable;
                nothing is prefetched). A short cycle is normalized by what it holds.
            loss_fn: ``loss_fn(model, batch) -> LossSum``; runs under the precision's autocast.

        Returns:
            :class:`StepStats` of the step. If anything raises, the partial cycle is discarded.

        Raises:
            BigBatchError: one whole batch (a dict or tensor) instead of a list of micro-batches.
            DistributedError: in a process group, the ranks hold different numbers of
                micro-batches (raised on every rank, before any gradient collective).
        """
        try:
            micro_batches = as_cycle(micro_batches, materialize=self.sync.active)
            n = len(micro_batches) if isinstance(micro_batches, Sized) else -1
            if self.sync.active:  # every rank must sync on the same micro-batch: agree on K
                self.sync.agree_on_micro_batches(n, self.device)
            if self._prescale is None:
                self._expected_micro = max(n, 1)
            for i, batch in enumerate(micro_batches):
                self.accumulate(batch, loss_fn, last=i == n - 1)
            return self.finish()
        except BaseException:
            self.discard()
            raise

    def accumulate(self, batch: Any, loss_fn: LossFn, *, last: bool = False) -> LossSum:
        """Run one micro-batch: forward under autocast, backward on its loss sum.

        The lower-level half of :meth:`step`, for loops that do other work between micro-batches;
        call :meth:`finish` after the cycle's last one. ``last=True`` on that last one lets a
        DDP/FSDP2 model sync in its backward (every rank must pass the same value; without it DDP
        syncs in :meth:`finish`, FSDP2 refuses).

        Raises:
            LossError: the loss function did not return a usable :class:`LossSum`.
        """
        if self._micro == 0:
            self._t0 = time.perf_counter()
            self.model.zero_grad(set_to_none=True)  # a cycle's gradient is its own, nothing else
            for f in self.features:
                f.begin_cycle()
        ls = self.runner.run(batch, loss_fn, last)
        self._micro += 1
        return ls

    def _run_micro(self, batch: Any, loss_fn: LossFn, *, sync: bool, frozen: bool) -> LossSum:
        """One forward and backward; adds its sum and count to the cycle's. ``frozen``: a piece
        re-run after an out-of-memory error, whose parameters may all be frozen already."""
        with self.sync.micro_batch(sync) as synced:
            with self.precision.autocast():
                ls = check_loss(loss_fn(self.model, batch))
            if self._prescale is None:  # the first cycle ever: estimate its count (one sync)
                self._prescale = self._first_prescale(ls.count)
            if ls.sum.requires_grad:
                self.precision.backward(ls.sum, self._prescale)
                if self.features:
                    if self._micro == 0:  # constant within the cycle; read once (a device sync)
                        self._scale = self._prescale * (self.precision.loss_scale or 1.0)
                    for f in self.features:
                        f.after_backward(ls.count, self._scale)
            elif not frozen:
                refuse_gradless(ls, self.sync.active)
        self._synced = synced
        self._loss_sum = self._loss_sum + ls.sum.detach().to(self._loss_sum.device, torch.float64)
        self._count = self._count + ls.count
        return ls

    def finish(self) -> StepStats:
        """Normalize the accumulated gradient by the cycle's item count and take the step.

        Returns:
            :class:`StepStats`; ``skipped`` when the cycle held no items or a non-finite
            loss/gradient (weights, optimizer state and scheduler are then untouched).

        Raises:
            NonFiniteError: a non-finite loss or gradient with ``on_nonfinite="stop"``.
        """
        sums = [f.local_sums() for f in self.features]
        if self.sync.active:  # the cycle's totals over all ranks: one small all-reduce
            totals, *sums = self.sync.all_reduce_sums([torch.stack([self._loss_sum, torch.as_tensor(
                self._count, dtype=torch.float64, device=self._loss_sum.device)]), *sums])
            self._loss_sum, self._count = totals[0], totals[1]
            if self._micro and not self._synced:
                self.sync.reduce_unsynced(self.precision.grads(self._params()))
        count = int(self._count)
        loss = float(self._loss_sum) / count if count else math.nan
        micro, scale = self._micro, self.precision.loss_scale
        lr = float(self.optimizer.param_groups[0]["lr"])
        grad_norm, reason, extra = math.nan, None, {}
        try:
            if count == 0:
                reason = "no items"
            elif not math.isfinite(loss):
                reason = "non-finite loss"
            else:
                grad_norm, reason = self._apply(count)
            for f, s in zip(self.features, sums):
                extra.update(f.end_cycle(s, reason is None, grad_norm, count))
            if reason in _NONFINITE and self.on_nonfinite == "stop":
                raise NonFiniteError(
                    f"{reason} (loss {loss}, grad norm {grad_norm}) at step "
                    f"{self.steps_taken + self.steps_skipped + 1}; the weights were not updated. "
                    "Lower the learning rate, check the data, or skip such steps "
                    "(on_nonfinite='skip')")
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            extra.update(self.runner.end_cycle(took_step=reason is None))
            seconds = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
            self._reset_cycle()
            if reason is None:
                self.steps_taken += 1
            else:
                self.steps_skipped += 1
        return StepStats(step=self.steps_taken + self.steps_skipped, loss=loss, count=count,
                         micro_batches=micro, grad_norm=grad_norm, lr=lr,
                         skipped=reason is not None, skip_reason=reason, seconds=seconds,
                         loss_scale=scale, **extra)

    def _apply(self, count: int) -> tuple[float, str | None]:
        """``g = G · W / (c · N)``, then unscale, clip and step (:meth:`PrecisionPolicy.apply`).

        ``G = c · Σ_k ∇sum_k`` on this rank; DDP and FSDP2 *average* it over the W ranks, hence
        the world size. The next cycle's prescale is this cycle's ``1 / N``.
        """
        world = self.sync.world_size if self.sync.active else 1
        assert self._prescale is not None  # set by the cycle's first micro-batch
        factor = world / (self._prescale * count)
        self._prescale = 1.0 / count
        return self.precision.apply(self.precision.grads(self._params()), factor,
                                    optimizer=self.optimizer, scheduler=self.scheduler,
                                    clip=self.clip_grad_norm, sharded=self.sync.kind == "fsdp2")

    def discard(self) -> None:
        """Drop the cycle in flight: its gradient, loss sum and count. Counters are unchanged."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        self._reset_cycle()

    # -- state -------------------------------------------------------------------------------

    @property
    def micro_step(self) -> int:
        """Micro-batches accumulated in the cycle in flight (0 between cycles)."""
        return self._micro

    @property
    def max_rows(self) -> int | None:
        """The largest piece a micro-batch runs in after out-of-memory splits (None: whole)."""
        return self.runner.max_rows

    @property
    def oom_split(self) -> bool:
        """Whether micro-batches that run out of memory are split (see ``oom``)."""
        return self.runner.split

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, also in the middle of a cycle.

        Always: the counters, the prescale, the fp16 scaler and the out-of-memory runner's state.
        With a cycle in flight, also its partial gradient (each parameter's ``.grad`` and float32
        buffer, cloned, in ``model.parameters()`` order), its loss sum, item count and the
        features' partial state, so a resumed run continues the cycle bit for bit.

        Under DDP a cycle in flight is this rank's own (its partial gradient, loss sum and count
        are not yet summed over ranks): each rank saves and restores its own.

        Raises:
            BigBatchError: a cycle is in flight under FSDP2 (its unsharded partial gradient is
                internal to FSDP2).
        """
        if self._micro and self.sync.kind == "fsdp2":
            raise BigBatchError(
                "state_dict() in the middle of a cycle is not available under FSDP2 (it keeps the "
                "partial gradient unsharded, out of reach); take it between cycles, after "
                "finish(), or use DDP")
        scaler = self.precision.scaler
        state: dict[str, Any] = {
            "steps_taken": self.steps_taken, "steps_skipped": self.steps_skipped,
            "prescale": self._prescale, "expected_micro": self._expected_micro,
            "scaler": None if scaler is None else scaler.state_dict(), "micro": self._micro,
            "runner": self.runner.state_dict()}
        if self._micro:
            state.update(
                loss_sum=self._loss_sum.detach().clone(), count=int(self._count),
                grads=[None if p.grad is None else p.grad.detach().clone()
                       for p in self.model.parameters()],
                fp32_buffers=self.precision.buffer_state(),
                features={f.name: f.state_dict() for f in self.features})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a cycle in flight included).

        Raises:
            BigBatchError: the saved gradients do not match this model's parameters.
        """
        self.discard()
        self.steps_taken = int(state["steps_taken"])
        self.steps_skipped = int(state["steps_skipped"])
        self._prescale = None if state["prescale"] is None else float(state["prescale"])
        self._expected_micro = int(state.get("expected_micro", 1))
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.runner.load_state_dict(state.get("runner") or {})
        if not int(state.get("micro", 0)):
            return
        params, grads = list(self.model.parameters()), state["grads"]
        if len(grads) != len(params) or any(
                g is not None and g.shape != p.shape for g, p in zip(grads, params)):
            raise BigBatchError("the saved partial gradient does not match this model's "
                                "parameters; resume with the model the checkpoint was taken from")
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        self.precision.load_buffer_state(state["fp32_buffers"])
        for f in self.features:
            f.load_state_dict(state.get("features", {}).get(f.name, {}))
        self._loss_sum = state["loss_sum"].to(self._loss_sum.device, torch.float64)
        self._count, self._micro = int(state["count"]), int(state["micro"])
        self._t0 = time.perf_counter()
        if self.features:
            self._scale = self._prescale * (self.precision.loss_scale or 1.0)  # type: ignore[operator]

    # -- internals ---------------------------------------------------------------------------

    def _first_prescale(self, count: int | torch.Tensor) -> float:
        """``1 / estimated item count`` of the first cycle: the first micro-batch's count times
        the micro-batches expected, summed over ranks so every rank uses the same constant."""
        estimate = torch.tensor(float(max(int(count), 1) * self._expected_micro),
                                dtype=torch.float64, device=self.device)
        return 1.0 / float(self.sync.all_reduce_sum(estimate))

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _reset_cycle(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._count: int | torch.Tensor = 0
        self._micro = 0
        self._synced = False  # did the cycle's latest micro-batch sync gradients across ranks?
        self._scale = 1.0  # c × loss scale of the cycle in flight (for the features)
        self._t0: float | None = None
        self.precision.release()
        for f in self.features:
            f.discard()
        self.runner.discard()
