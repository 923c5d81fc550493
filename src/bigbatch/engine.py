"""The accumulation engine: one optimizer step over K micro-batches, exactly.

Each micro-batch's loss function returns a :class:`~bigbatch.LossSum`. The engine backpropagates the
*sum* (so the ``.grad`` buffers hold sums), and once the cycle is complete divides the accumulated
gradient by the cycle's total item count — once:

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)

That is the gradient of the mean loss over every item of the effective batch, whatever the padding
of each micro-batch and however many micro-batches the cycle holds. Then, each exactly once per
cycle and in this order: fp16 unscale, gradient norm, clipping, ``optimizer.step()``,
``scheduler.step()``, ``optimizer.zero_grad(set_to_none=True)``.

Numerical range: backward runs on ``c · sum_k`` with ``c = 1 / (previous cycle's item count)``, a
constant for the whole cycle, and the final division is by ``c · N``. The constant cancels exactly
in the mathematics; it keeps gradient magnitudes at the scale of a mean loss, which matters for
fp16, whose range a sum over many tokens would overflow. Before the first cycle has been counted,
``c`` is estimated from the first micro-batch: ``1 / (count_1 × micro-batches in the cycle)``.
Without fp16 loss scaling the backward is seeded with ``c`` (``sum_k.backward(c)``, no
multiplication node), and the division by ``c · N`` is folded into the clipping factor:
``g ← G · min(1, max_norm / (‖G‖/(c·N) + 1e-6)) / (c·N)`` is one pass over the gradients.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import BatchPlanError, BigBatchError, LossError
from .loss import LossSum
from .memory import OutOfMemory, is_out_of_memory, release_memory
from .noise import MicroGradNorms, NoiseEstimate
from .parallel import GradSync, SyncMode
from .plan import _rows, _slice
from .pooled import PooledBatchNorm
from .precision import Precision, PrecisionPolicy

__all__ = ["Accumulator", "BatchNormWarning", "NonFiniteError", "StepStats"]

LossFn = Callable[[torch.nn.Module, Any], LossSum]
OnNonFinite = Literal["skip", "raise"]
BatchNormMode = Literal["warn", "pooled", "ignore"]
OomMode = Literal["auto", "split", "raise"]


class BatchNormWarning(UserWarning):
    """The model has layers whose statistics span the micro-batch, not the effective batch."""


class NonFiniteError(BigBatchError):
    """A loss or gradient was NaN or infinite and ``on_nonfinite="raise"`` was chosen."""


@dataclass(frozen=True)
class StepStats:
    """What one call to :meth:`Accumulator.step` (or :meth:`Accumulator.finish`) did.

    Attributes:
        step: index of this cycle, counting taken and skipped steps (1 for the first).
        loss: exact mean loss over the cycle, ``Σ sum_k / Σ count_k`` (NaN when it holds no items).
        count: items the cycle held, ``Σ count_k``.
        micro_batches: micro-batches the cycle held.
        grad_norm: L2 norm of the normalized (and unscaled) gradient before clipping; NaN when the
            step was skipped before it was computed.
        lr: learning rate of the first parameter group used for this step.
        skipped: True when no optimizer update was applied.
        skip_reason: why it was skipped (``"no items"``, ``"non-finite loss"``,
            ``"non-finite gradient"``, ``"fp16 overflow"``), else None.
        seconds: wall time of the cycle, first forward to the end of the step.
        loss_scale: the fp16 loss scale used in this cycle (None for fp32/bf16).
        noise: the cycle's gradient-noise estimate with ``noise_scale=True`` (None otherwise, on
            a skipped step, or with fewer than two micro-batches holding items, or when a
            backward ran out of memory in the cycle).
        oom_splits: micro-batches (or pieces) of this cycle that ran out of memory and were split.
        max_rows: the largest piece a micro-batch now runs in, after out-of-memory splits (None:
            micro-batches run whole).
    """

    step: int
    loss: float
    count: int
    micro_batches: int
    grad_norm: float
    lr: float
    skipped: bool
    skip_reason: str | None
    seconds: float
    loss_scale: float | None = None
    noise: NoiseEstimate | None = None
    oom_splits: int = 0
    max_rows: int | None = None


class Accumulator:
    """Runs one exact optimizer step over a cycle of micro-batches.

    Args:
        model: the module being trained.
        optimizer: its optimizer; stepped once per cycle.
        scheduler: optional learning-rate scheduler; stepped once per applied optimizer step (never
            on a skipped one).
        clip_grad_norm: if set, the accumulated, normalized gradient is clipped to this L2 norm
            (``coef = min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`bigbatch.precision`).
        on_nonfinite: a NaN/inf loss or gradient ``"skip"``\\ s the step (weights, optimizer state
            and scheduler untouched; reported in :class:`StepStats`) or ``"raise"``\\ s
            :class:`NonFiniteError`. fp16 overflow always skips: the loss scale is then lowered.
        sync: for a DDP or FSDP2 model, ``"cycle"`` syncs gradients once per optimizer step (on
            the cycle's last micro-batch); ``"micro"`` after every micro-batch (FSDP2: sharded
            gradients only, less memory). Ignored outside a process group; see
            :mod:`bigbatch.parallel`.
        batchnorm: models with BatchNorm layers: ``"warn"`` (:class:`BatchNormWarning` at
            construction), ``"ignore"``, or ``"pooled"``: a :class:`~bigbatch.PooledBatchNorm`
            gives each layer's running statistics one update per optimizer step taken, from its
            statistics pooled over the cycle — the update of a full-batch BatchNorm. A skipped
            step drops them (running statistics untouched, like the weights). Normalization
            itself still uses each micro-batch's statistics; to avoid that, convert the layers
            (:func:`~bigbatch.convert_batchnorm`).

        noise_scale: measure the gradient noise scale every cycle (``StepStats.noise``; see
            :mod:`bigbatch.noise`): tensor hooks take each micro-batch's squared gradient norm.
            Not with FSDP2 (its sharded gradients hide the per-rank micro-batch gradient).
        oom: what an out-of-memory error in a micro-batch does. ``"split"``: free what it held,
            split it in two halves along dimension 0 and run those (recursively), keeping the
            gradient the cycle has accumulated; the step is unchanged, since the halves' sums add
            up to the whole's. Later micro-batches then run in pieces of at most that many rows
            (``max_rows``), and after ``oom_regrow_after`` clean optimizer steps the size is
            doubled again towards the largest micro-batch seen. ``"raise"``: the error propagates
            (the cycle is left to :meth:`discard`). ``"auto"``: ``"split"`` except under FSDP2 and
            under DDP with buffer broadcasting (their collectives cannot survive a retried
            micro-batch on one rank), where it is ``"raise"``. Under DDP, ``"split"`` syncs the
            gradient once in :meth:`finish` rather than during the last backward, so that a rank
            can retry a micro-batch on its own: one all-reduce per step either way, not
            overlapped with the backward.
        oom_regrow_after: clean optimizer steps before a split size is doubled again.

    Raises:
        BigBatchError: an argument is out of range (see the message).

    The engine owns ``.grad`` while a cycle runs: it starts each cycle from no gradient and leaves
    none behind (``zero_grad(set_to_none=True)``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any | None = None,
        clip_grad_norm: float | None = None,
        precision: Precision = "fp32",
        on_nonfinite: OnNonFinite = "skip",
        sync: SyncMode = "cycle",
        batchnorm: BatchNormMode = "warn",
        noise_scale: bool = False,
        oom: OomMode = "auto",
        oom_regrow_after: int = 100,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise BigBatchError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise BigBatchError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if clip_grad_norm is not None and not (
            isinstance(clip_grad_norm, (int, float)) and 0 < clip_grad_norm < math.inf
        ):
            raise BigBatchError(
                f"clip_grad_norm must be a positive finite number or None, got {clip_grad_norm!r}"
            )
        if on_nonfinite not in ("skip", "raise"):
            raise BigBatchError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        param = next(model.parameters(), None)
        if param is None:
            raise BigBatchError("model has no parameters to train")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.on_nonfinite: OnNonFinite = on_nonfinite
        self.device = param.device
        self.precision = PrecisionPolicy(precision, model, self.device)
        self.sync = GradSync(model, sync)
        if noise_scale and self.sync.kind == "fsdp2":
            raise BigBatchError("noise_scale needs each rank's micro-batch gradient, which FSDP2 "
                                "shards away; use DDP, or turn the noise scale off")
        self.noise = MicroGradNorms(list(model.parameters()), self.device) if noise_scale else None
        self._noise_factor = 1.0  # c × loss scale of the cycle in flight
        self._synced = False  # did the cycle's latest micro-batch sync gradients across ranks?
        self.steps_taken = 0
        self.steps_skipped = 0
        self._prescale: float | None = None  # see the module docstring
        self._expected_micro = 1
        self._seed_tensor: torch.Tensor | None = None  # the prescale as backward's seed
        self._seed_value: float | None = None
        self._reset_cycle()
        if batchnorm not in ("warn", "pooled", "ignore"):
            raise BigBatchError(
                f"batchnorm must be 'warn', 'pooled' or 'ignore', got {batchnorm!r}")
        self._bn = PooledBatchNorm(model) if batchnorm == "pooled" else None
        if batchnorm == "warn":
            _warn_batchnorm(model)
        self._setup_oom(oom, oom_regrow_after)

    # -- the cycle ---------------------------------------------------------------------------

    def step(self, micro_batches: Iterable[Any], loss_fn: LossFn) -> StepStats:
        """Accumulate every micro-batch of one cycle, then take one optimizer step.

        Args:
            micro_batches: the cycle's micro-batches, read one at a time (a list, or any
                iterable; nothing is prefetched). A short cycle is normalized by what it holds.
            loss_fn: ``loss_fn(model, batch) -> LossSum``; runs under the precision's autocast.

        Returns:
            :class:`StepStats` of the step. If anything raises, the partial cycle is discarded.

        Raises:
            DistributedError: in a process group, the ranks hold different numbers of
                micro-batches (raised on every rank, before any gradient collective).

        In a process group the micro-batches are counted first (an iterator is read into a list)
        and the ranks agree on that count, so the gradient sync runs on the same micro-batch
        everywhere and no rank waits forever for another.
        """
        try:
            if self.sync.active:
                micro_batches = list(micro_batches)
                self.sync.agree_on_micro_batches(len(micro_batches), self.device)
            if self._prescale is None and isinstance(micro_batches, Sized):
                self._expected_micro = max(len(micro_batches), 1)
            n = len(micro_batches) if isinstance(micro_batches, Sized) else -1
            for i, batch in enumerate(micro_batches):
                self.accumulate(batch, loss_fn, last=i == n - 1)
            return self.finish()
        except BaseException:
            self.discard()
            raise

    def accumulate(self, batch: Any, loss_fn: LossFn, *, last: bool = False) -> LossSum:
        """Run one micro-batch: forward under autocast, backward on its (scaled) loss sum.

        The lower-level half of :meth:`step`, for loops that interleave other work between
        micro-batches; call :meth:`finish` after the cycle's last micro-batch.

        Args:
            batch: the micro-batch, passed to ``loss_fn``.
            loss_fn: ``loss_fn(model, batch) -> LossSum``.
            last: this is the cycle's final micro-batch. Only matters for a DDP/FSDP2 model that
                syncs in backward (``oom="raise"``, or FSDP2): its backward then syncs gradients
                across ranks, and every rank must pass the same value. (Under DDP a cycle with no
                ``last=True`` is synced in :meth:`finish` instead, without overlapping backward;
                under FSDP2 that is an error. With ``oom="split"`` DDP always syncs in
                :meth:`finish`.)

        Returns:
            The :class:`LossSum` the loss function returned.

        Raises:
            LossError: the loss function did not return a usable :class:`LossSum`.
        """
        if self._micro == 0:
            self._t0 = time.perf_counter()
            self.model.zero_grad(set_to_none=True)  # a cycle's gradient is its own, nothing else
            if self._bn is not None:
                self._bn.discard()  # so are its BatchNorm statistics
        if self.oom_split:
            ls = self._accumulate_splitting(batch, loss_fn)
        else:
            ls = self._forward_backward(batch, loss_fn, last)
        self._micro += 1
        return ls

    def _forward_backward(self, batch: Any, loss_fn: LossFn, last: bool,
                          frozen: bool = False) -> LossSum:
        """One forward and backward; adds the loss sum and count to the cycle's."""
        with self.sync.micro_batch(last and not self.oom_split) as synced:
            with self.precision.autocast():
                out = loss_fn(self.model, batch)
            ls = _check_loss(out)
            if self._prescale is None:  # first cycle ever: estimate the cycle's count (one sync)
                self._prescale = self._first_prescale(ls.count)
            if ls.sum.requires_grad:
                if self.precision.scaler is None:  # d(sum·c)/d(sum) = c: seed backward with c
                    ls.sum.backward(self._seed(ls.sum))  # (no multiplication node per micro)
                else:
                    self.precision.scale(ls.sum * self._prescale).backward()
                self.precision.collect()
                if self.noise is not None:
                    if self._micro == 0:  # constant within a cycle; read once (a device sync)
                        self._noise_factor = self._prescale * (self.precision.loss_scale or 1.0)
                    self.noise.end_micro(ls.count, self._noise_factor)
            elif frozen:
                pass  # every parameter it reaches already holds this piece's gradient
            elif self.sync.active:
                raise LossError(
                    "loss_fn returned a LossSum whose sum carries no gradient; under DDP/FSDP2 "
                    "every micro-batch must backpropagate (the other ranks wait for its gradient "
                    "sync): return a masked sum of the forward's output, which is 0 with a graph"
                )
            elif not (isinstance(ls.count, int) and ls.count == 0):
                raise LossError(
                    "loss_fn returned a LossSum whose sum carries no gradient (was it detached or "
                    "computed under torch.no_grad?); only an empty micro-batch (count 0) may do "
                    "that"
                )
        self._synced = synced
        self._loss_sum = self._loss_sum + ls.sum.detach().to(self._loss_sum.device, torch.float64)
        self._count = self._count + ls.count
        return ls

    # -- out of memory -------------------------------------------------------------------------

    def _setup_oom(self, oom: str, regrow_after: int) -> None:
        if oom not in ("auto", "split", "raise"):
            raise BigBatchError(f"oom must be 'auto', 'split' or 'raise', got {oom!r}")
        if isinstance(regrow_after, bool) or not isinstance(regrow_after, int) or regrow_after < 1:
            raise BigBatchError(
                f"oom_regrow_after must be a positive integer, got {regrow_after!r}")
        blocked = None
        if self.sync.kind == "fsdp2":
            blocked = "FSDP2's state cannot survive an out-of-memory error mid-backward"
        elif self.sync.kind == "ddp" and getattr(self.model, "broadcast_buffers", False) and any(
                True for _ in self.model.buffers()):
            blocked = ("DDP broadcasts the model's buffers in every forward, a collective that a "
                       "retried micro-batch on one rank would misalign (pass "
                       "broadcast_buffers=False to DistributedDataParallel to allow it)")
        if oom == "split" and blocked:
            raise BigBatchError(f"oom='split' is not available here: {blocked}; use oom='raise'")
        self.oom_split = oom == "split" or (oom == "auto" and blocked is None)
        self.max_rows: int | None = None  # pieces of at most this many rows after an OOM
        self._largest_rows = 0
        self._clean_steps = 0
        self._regrow_after = regrow_after
        self._regrow_every = regrow_after
        self._regrown = False
        self._oom_splits = 0
        self._noise_ok = True
        self._touched: list[torch.Tensor] = []
        self._oom_frozen: list[torch.nn.Parameter] = []
        if self.oom_split:  # which parameters a backward that failed had already reached
            self._oom_hooks = [p.register_post_accumulate_grad_hook(self._touched.append)
                               for p in self.model.parameters() if p.requires_grad]

    def _accumulate_splitting(self, batch: Any, loss_fn: LossFn) -> LossSum:
        """Run ``batch`` in pieces of at most ``max_rows`` rows, splitting any that run out of
        memory; in a process group nothing syncs until :meth:`finish`."""
        try:
            rows = _rows(batch, "batch")
        except BatchPlanError:
            rows = None
        if rows:
            self._largest_rows = max(self._largest_rows, rows)
        if rows is None or self.max_rows is None or rows <= self.max_rows:
            return self._run_piece(batch, loss_fn, rows)
        cap = self.max_rows
        parts = [self._run_piece(_slice(batch, a, min(a + cap, rows)), loss_fn,
                                 min(a + cap, rows) - a) for a in range(0, rows, cap)]
        return _combine(parts)

    def _run_piece(self, batch: Any, loss_fn: LossFn, rows: int | None) -> LossSum:
        self._touched.clear()
        pooled = self._bn.snapshot() if self._bn is not None else None
        frozen = bool(self._oom_frozen)
        try:
            return self._forward_backward(batch, loss_fn, last=False, frozen=frozen)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            what = str(err).strip().splitlines()[0][:200] if str(err).strip() else "out of memory"
        # Outside the except block: the error's traceback, and the graph its frames held, are gone.
        touched = {id(p) for p in self._touched}
        self._touched.clear()
        if self.noise is not None:
            self.noise.drop_micro()
            self._noise_ok = self._noise_ok and not touched
        if pooled is not None:
            self._bn.rollback(pooled)  # type: ignore[union-attr]
        release_memory(self.device)
        if rows is None or rows < 2:
            raise OutOfMemory(
                f"out of memory in a micro-batch of {rows if rows is not None else 'unknown'} "
                f"row(s), which cannot be split further ({what}); make one sample fit: activation "
                "checkpointing, bf16, shorter sequences or a smaller model")
        self._oom_splits += 1
        if self._regrown:  # the larger size failed again: wait longer before the next try
            self._regrow_every *= 2
            self._regrown = False
        self._clean_steps = 0
        half = (rows + 1) // 2
        self.max_rows = half if self.max_rows is None else min(self.max_rows, half)
        # Parameters the failed backward reached hold this piece's whole gradient already: the
        # halves must not add it again, so they do not reach them.
        newly = [p for p in self.model.parameters() if id(p) in touched and p.requires_grad]
        for p in newly:
            p.requires_grad_(False)
        self._oom_frozen.extend(newly)
        try:
            parts = [self._run_piece(_slice(batch, 0, half), loss_fn, half),
                     self._run_piece(_slice(batch, half, rows), loss_fn, rows - half)]
        finally:
            for p in newly:
                p.requires_grad_(True)
            del self._oom_frozen[len(self._oom_frozen) - len(newly):]
        return _combine(parts)

    def _oom_cycle_end(self, took_step: bool) -> None:
        """After a cycle: count clean steps, and let a split size grow back after enough."""
        if self._oom_splits or not took_step:
            return
        self._clean_steps += 1
        if self.max_rows is not None and self._clean_steps >= self._regrow_every:
            grown = min(2 * self.max_rows, self._largest_rows)
            self.max_rows = None if grown >= self._largest_rows else grown
            self._clean_steps = 0
            self._regrown = True

    def finish(self) -> StepStats:
        """Normalize the accumulated gradient by the cycle's item count and take the step.

        Returns:
            :class:`StepStats`; ``skipped`` is True when the cycle held no items or a non-finite
            loss/gradient (weights, optimizer state and scheduler are then untouched).

        Raises:
            NonFiniteError: a non-finite loss or gradient with ``on_nonfinite="raise"``.
        """
        noise_sums = self.noise.local_sums() if self.noise is not None else None
        if self.sync.active:  # the cycle's totals over all ranks: one small all-reduce
            totals = torch.cat([torch.stack([self._loss_sum, torch.as_tensor(
                self._count, dtype=torch.float64, device=self._loss_sum.device)]),
                *([] if noise_sums is None else [noise_sums])])
            totals = self.sync.all_reduce_sum(totals)
            self._loss_sum, self._count, noise_sums = totals[0], totals[1], totals[2:]
            if self._micro and not self._synced:
                self.sync.reduce_unsynced(self.precision.grads(self._params()))
        count = int(self._count)
        loss = float(self._loss_sum) / count if count else math.nan
        micro, lr, scale = self._micro, self._lr(), self.precision.loss_scale
        grad_norm, reason, noise = math.nan, None, None
        try:
            if count == 0:
                reason = "no items"
            elif not math.isfinite(loss):
                reason = "non-finite loss"
            else:
                grad_norm, reason = self._normalize_and_apply(count)
                if (self.noise is not None and noise_sums is not None and reason is None
                        and self._noise_ok):
                    noise = self.noise.estimate(noise_sums, grad_norm**2, count)
                if reason is None and self._bn is not None:
                    self._bn.step()  # one running-statistics update per optimizer step taken
            if reason in ("non-finite loss", "non-finite gradient") and (
                self.on_nonfinite == "raise"
            ):
                raise NonFiniteError(
                    f"{reason} (loss {loss}, grad norm {grad_norm}) at step "
                    f"{self.steps_taken + self.steps_skipped + 1}; the weights were not updated. "
                    "Lower the learning rate, check the data, or use on_nonfinite='skip'"
                )
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            if self._bn is not None:
                self._bn.discard()  # a skipped step leaves the running statistics too
            seconds = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
            oom_splits = self._oom_splits
            self._oom_cycle_end(took_step=reason is None)
            self._reset_cycle()
            if reason is None:
                self.steps_taken += 1
            else:
                self.steps_skipped += 1
        return StepStats(
            step=self.steps_taken + self.steps_skipped,
            loss=loss,
            count=count,
            micro_batches=micro,
            grad_norm=grad_norm,
            lr=lr,
            skipped=reason is not None,
            skip_reason=reason,
            seconds=seconds,
            loss_scale=scale,
            noise=noise,
            oom_splits=oom_splits,
            max_rows=self.max_rows,
        )

    def discard(self) -> None:
        """Drop the cycle in flight: its gradient, loss sum and count. Counters are unchanged."""
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        if self._bn is not None:
            self._bn.discard()
        self._reset_cycle()

    # -- state -------------------------------------------------------------------------------

    @property
    def micro_step(self) -> int:
        """Micro-batches accumulated in the cycle in flight (0 between cycles)."""
        return self._micro

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, also in the middle of a cycle.

        Between cycles: the counters, the loss prescale and the fp16 scaler state. With a cycle in
        flight, also its partial gradient (each parameter's ``.grad`` and float32 buffer, cloned),
        its running loss sum and item count, so a resumed run continues the cycle bit for bit.
        Parameters are listed in ``model.parameters()`` order.

        Raises:
            BigBatchError: a cycle is in flight in a process group of more than one rank.
        """
        if self._micro and self.sync.world_size > 1:
            raise BigBatchError(
                "state_dict() in the middle of a cycle is per rank under DDP/FSDP2 (each holds its "
                "own partial gradient); take it between cycles, after finish()")
        scaler = self.precision.scaler
        state: dict[str, Any] = {
            "steps_taken": self.steps_taken,
            "steps_skipped": self.steps_skipped,
            "prescale": self._prescale,
            "expected_micro": self._expected_micro,
            "scaler": None if scaler is None else scaler.state_dict(),
            "micro": self._micro,
            "oom": {"max_rows": self.max_rows, "largest_rows": self._largest_rows,
                    "clean_steps": self._clean_steps, "regrow_every": self._regrow_every,
                    "regrown": self._regrown},
        }
        if self._micro:
            state["loss_sum"] = self._loss_sum.detach().clone()
            state["count"] = int(self._count)
            state["grads"] = [None if p.grad is None else p.grad.detach().clone()
                              for p in self.model.parameters()]
            state["fp32_buffers"] = self.precision.buffer_state()
            if self.noise is not None:
                state["noise_sums"] = self.noise.local_sums().clone()
                state["noise_factor"] = self._noise_factor
            if self._bn is not None:
                state["batchnorm"] = self._bn.state_dict()
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
        oom = state.get("oom") or {}
        self.max_rows = None if oom.get("max_rows") is None else int(oom["max_rows"])
        self._largest_rows = int(oom.get("largest_rows", 0))
        self._clean_steps = int(oom.get("clean_steps", 0))
        self._regrow_every = int(oom.get("regrow_every", self._regrow_after))
        self._regrown = bool(oom.get("regrown", False))
        micro = int(state.get("micro", 0))
        if not micro:
            return
        params = list(self.model.parameters())
        grads = state["grads"]
        if len(grads) != len(params) or any(
            g is not None and g.shape != p.shape for g, p in zip(grads, params)
        ):
            raise BigBatchError(
                "the saved partial gradient does not match this model's parameters; resume with "
                "the model the checkpoint was taken from"
            )
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
        self.precision.load_buffer_state(state["fp32_buffers"])
        if self._bn is not None:
            self._bn.load_state_dict(state.get("batchnorm", {}))
        self._loss_sum = state["loss_sum"].to(self._loss_sum.device, torch.float64)
        self._count = int(state["count"])
        self._micro = micro
        self._t0 = time.perf_counter()
        if self.noise is not None and "noise_sums" in state:
            self.noise.local_sums().copy_(state["noise_sums"])
            self._noise_factor = float(state["noise_factor"])

    # -- internals ---------------------------------------------------------------------------

    def _normalize_and_apply(self, count: int) -> tuple[float, str | None]:
        """Divide the gradient by the item count, unscale, clip, step. Returns (norm, skip reason).

        The ``torch._foreach_*`` kernels are the ones ``torch.optim`` and ``clip_grad_norm_`` use:
        one launch per group of tensors instead of one per parameter.
        """
        grads = self.precision.grads(self._params())
        assert self._prescale is not None  # set by the cycle's first accumulate()
        # The accumulated gradient is G = c·Σ_k ∇sum_k (c: the prescale; DDP and FSDP2 average
        # it over ranks, hence the world size): g = f·G with f = world / (c·count).
        world = self.sync.world_size if self.sync.active else 1
        factor = world / (self._prescale * count)
        self._prescale = 1.0 / count
        scaler = self.precision.scaler
        if scaler is not None:  # unscale_ reads the gradient as the optimizer would: scale first
            if grads:
                torch._foreach_mul_(grads, factor)
            factor = 1.0
            scaler.unscale_(self.optimizer)
        norm = _total_norm(grads) * factor  # ‖f·G‖ = f·‖G‖
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            if scaler is None:
                return grad_norm, "non-finite gradient"
            scaler.update()  # records the overflow and lowers the scale; no optimizer step
            return grad_norm, "fp16 overflow"
        # One pass over the gradients: G × f × min(1, max_norm / (‖g‖ + 1e-6)).
        if grads and self.clip_grad_norm is not None:
            if self.sync.kind == "fsdp2":  # sharded DTensor gradients: a Python scalar mixes in
                torch._foreach_mul_(
                    grads, factor * min(1.0, self.clip_grad_norm / (grad_norm + 1e-6)))
            else:
                coef = torch.clamp(self.clip_grad_norm / (norm + 1e-6), max=1.0) * factor
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        elif grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)
        self.precision.write_back()
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return grad_norm, None

    def _first_prescale(self, count: int | torch.Tensor) -> float:
        """``1 / estimated item count`` of the first cycle: the first micro-batch's count times
        the micro-batches expected, summed over ranks so every rank uses the same constant."""
        estimate = torch.tensor(float(max(int(count), 1) * self._expected_micro),
                                dtype=torch.float64, device=self.device)
        return 1.0 / float(self.sync.all_reduce_sum(estimate))

    def _seed(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The prescale ``c`` as a scalar tensor like ``loss_sum`` (made once per cycle)."""
        seed = self._seed_tensor
        if (seed is None or seed.dtype != loss_sum.dtype or seed.device != loss_sum.device
                or self._seed_value != self._prescale):
            seed = torch.full((), self._prescale, dtype=loss_sum.dtype, device=loss_sum.device)
            self._seed_tensor, self._seed_value = seed, self._prescale
        return seed

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _reset_cycle(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._count: int | torch.Tensor = 0
        self._micro = 0
        self._t0: float | None = None
        self._oom_splits = 0
        self._noise_ok = True
        self.precision.release()
        if getattr(self, "noise", None) is not None:
            self.noise.reset()  # type: ignore[union-attr]


def _combine(parts: list[LossSum]) -> LossSum:
    """The pieces of one micro-batch as one :class:`LossSum` (detached sum, total count)."""
    total = parts[0].sum.detach()
    count = parts[0].count
    for ls in parts[1:]:
        total = total + ls.sum.detach().to(total.device)
        count = count + ls.count
    return LossSum(total, count)


def _check_loss(out: object) -> LossSum:
    if not isinstance(out, LossSum):
        hint = (
            " (wrap a mean-reduced loss as bigbatch.LossSum.from_mean(loss, n_items))"
            if isinstance(out, torch.Tensor)
            else ""
        )
        raise LossError(
            f"loss_fn must return bigbatch.LossSum(sum, count), got {type(out).__name__}{hint}"
        )
    if not isinstance(out.sum, torch.Tensor) or out.sum.dim() != 0:
        raise LossError(
            "LossSum.sum must be a scalar tensor, got "
            + (f"shape {tuple(out.sum.shape)}" if isinstance(out.sum, torch.Tensor) else
               type(out.sum).__name__)
            + "; sum the per-item losses (reduction='sum')"
        )
    count = out.count
    if isinstance(count, torch.Tensor):
        if count.dim() != 0 or count.is_floating_point() or count.is_complex():
            raise LossError(
                f"LossSum.count must be an int or an integer scalar tensor, got a {count.dtype} "
                f"tensor of shape {tuple(count.shape)}"
            )
    elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LossError(f"LossSum.count must be a non-negative int, got {count!r}")
    return out


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradient tensors, in the widest dtype among them.

    Sharded (DTensor) gradients of FSDP2 go through ``torch.nn.utils.get_total_norm``, which
    combines the shards' partial norms across ranks.
    """
    if not grads:
        return torch.zeros(())
    if type(grads[0]).__name__ == "DTensor":
        return torch.nn.utils.get_total_norm(grads).full_tensor()  # type: ignore[attr-defined]
    norms = torch._foreach_norm(grads)
    dtype = max((n.dtype for n in norms), key=lambda d: torch.finfo(d).bits)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))


def _warn_batchnorm(model: torch.nn.Module) -> None:
    names = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if not names:
        return
    shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
    warnings.warn(
        f"the model has BatchNorm layers ({shown}): under gradient accumulation their batch "
        "statistics and running-statistic updates see one micro-batch, not the effective batch, "
        "so training is not equivalent to the full batch. If that matters, convert them "
        "(bigbatch.convert_batchnorm(model, to='group' or 'freeze')) or pool their running "
        "statistics (Accumulator(..., batchnorm='pooled')); batchnorm='ignore' silences this",
        BatchNormWarning,
        stacklevel=3,
    )
