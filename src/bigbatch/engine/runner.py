"""How a micro-batch is run: whole, or split in halves when it runs out of memory.

The engine hands each micro-batch to a runner, which calls the engine's forward-and-backward once
(:class:`DirectRunner`) or as often as the memory needs (:class:`SplitRunner`). Splitting keeps the
step exact because the rule only adds sums: rows ``R = A ∪ B`` give
``∇sum_R = ∇sum_A + ∇sum_B`` and ``count_R = count_A + count_B``.

The one subtlety is a backward that fails half-way: the parameters it already reached hold the
piece's *whole* gradient (autograd adds a leaf's gradient once, when it is complete). They are
found with ``register_post_accumulate_grad_hook`` and frozen (``requires_grad_(False)``) while the
halves run, so nothing is added twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ..batching import batch_rows, slice_rows
from ..errors import BatchPlanError, BigBatchError
from ..loss import LossSum
from ..memory import OutOfMemory, is_out_of_memory, release_memory
from .features import Feature

__all__ = ["DirectRunner", "OomMode", "SplitRunner", "make_runner"]

OomMode = Literal["auto", "split", "stop"]
RunMicro = Callable[..., LossSum]  # run_micro(batch, loss_fn, *, sync, frozen) -> LossSum


class DirectRunner:
    """Runs each micro-batch whole; an out-of-memory error propagates (``oom="stop"``).

    Under DDP/FSDP2 the cycle's last micro-batch syncs during its backward (overlapped).
    """

    split = False
    max_rows: int | None = None

    def __init__(self, run_micro: RunMicro) -> None:
        self._run = run_micro

    def run(self, batch: Any, loss_fn: Any, last: bool) -> LossSum:
        return self._run(batch, loss_fn, sync=last, frozen=False)

    def end_cycle(self, took_step: bool) -> dict[str, Any]:
        return {"oom_splits": 0, "max_rows": None}

    def discard(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SplitRunner:
    """Runs micro-batches in pieces of at most :attr:`max_rows` rows, halving any piece that runs
    out of memory (recursively, down to one row), and keeps what the cycle has accumulated.

    After an error the size sticks; after ``regrow_after`` clean optimizer steps it doubles back
    towards the largest micro-batch seen, and if that fails again the wait doubles. Nothing syncs
    in backward (a rank may retry alone); under DDP the engine all-reduces once per cycle instead.

    Args:
        model: the module trained (its parameters get post-accumulate-grad hooks).
        device: where it runs (memory is released there after an error).
        run_micro: the engine's forward and backward of one piece.
        features: the engine's features, told of a piece that is undone.
        regrow_after: clean optimizer steps before a split size doubles again.
    """

    split = True

    def __init__(self, model: torch.nn.Module, device: torch.device, run_micro: RunMicro,
                 features: Sequence[Feature], regrow_after: int) -> None:
        self.model, self.device, self._run, self._features = model, device, run_micro, features
        self.max_rows: int | None = None
        self._largest = 0
        self._clean = 0
        self._regrow_after = self._regrow_every = regrow_after
        self._regrown = False
        self._splits = 0  # in the cycle in flight
        self._touched: list[torch.Tensor] = []
        self._frozen: list[torch.nn.Parameter] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._touched.append)
                       for p in model.parameters() if p.requires_grad]

    def run(self, batch: Any, loss_fn: Any, last: bool) -> LossSum:
        try:
            rows = batch_rows(batch)
        except BatchPlanError:
            rows = None
        if rows:
            self._largest = max(self._largest, rows)
        if rows is None or self.max_rows is None or rows <= self.max_rows:
            return self._piece(batch, loss_fn, rows)
        cap = self.max_rows
        return _combine([self._piece(slice_rows(batch, a, min(a + cap, rows)), loss_fn,
                                     min(a + cap, rows) - a) for a in range(0, rows, cap)])

    def _piece(self, batch: Any, loss_fn: Any, rows: int | None) -> LossSum:
        self._touched.clear()
        marks = [f.mark() for f in self._features] if self._features else []
        try:
            return self._run(batch, loss_fn, sync=False, frozen=bool(self._frozen))
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            what = str(err).strip().splitlines()[0][:200] if str(err).strip() else "out of memory"
        # Outside the except block: the error's traceback, and the graph its frames held, are gone.
        touched = {id(p) for p in self.reached()}
        self._touched.clear()
        for f, mark in zip(self._features, marks):
            f.undo(mark, reached_gradients=bool(touched))
        release_memory(self.device)
        if rows is None or rows < 2:
            raise OutOfMemory(
                f"out of memory in a micro-batch of {rows if rows is not None else 'unknown'} "
                f"row(s), which cannot be split further ({what}); make one sample fit: activation "
                "checkpointing, bf16, shorter sequences or a smaller model")
        self._splits += 1
        if self._regrown:  # the larger size failed again: wait longer before the next try
            self._regrow_every *= 2
            self._regrown = False
        self._clean = 0
        half = (rows + 1) // 2
        self.max_rows = half if self.max_rows is None else min(self.max_rows, half)
        # Parameters the failed backward reached hold this piece's whole gradient already: the
        # halves must not add it again, so they do not reach them.
        newly = [p for p in self.model.parameters() if id(p) in touched and p.requires_grad]
        for p in newly:
            p.requires_grad_(False)
        self._frozen.extend(newly)
        try:
            return _combine([self._piece(slice_rows(batch, 0, half), loss_fn, half),
                             self._piece(slice_rows(batch, half, rows), loss_fn, rows - half)])
        finally:
            for p in newly:
                p.requires_grad_(True)
            del self._frozen[len(self._frozen) - len(newly):]

    def reached(self) -> list[torch.Tensor]:
        """The parameters whose ``.grad`` the last piece's backward completed before it failed
        (frozen while its halves run, so their gradient is not added twice)."""
        return list(self._touched)

    @property
    def regrow_every(self) -> int:
        """Clean optimizer steps the current split size waits before it doubles back."""
        return self._regrow_every

    def end_cycle(self, took_step: bool) -> dict[str, Any]:
        """Count clean steps, let a split size grow back after enough; the cycle's stats."""
        splits, self._splits = self._splits, 0
        if not splits and took_step:
            self._clean += 1
            if self.max_rows is not None and self._clean >= self._regrow_every:
                grown = min(2 * self.max_rows, self._largest)
                self.max_rows = None if grown >= self._largest else grown
                self._clean = 0
                self._regrown = True
        return {"oom_splits": splits, "max_rows": self.max_rows}

    def discard(self) -> None:
        self._splits = 0

    def state_dict(self) -> dict[str, Any]:
        return {"max_rows": self.max_rows, "largest_rows": self._largest,
                "clean_steps": self._clean, "regrow_every": self._regrow_every,
                "regrown": self._regrown}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_rows = None if state.get("max_rows") is None else int(state["max_rows"])
        self._largest = int(state.get("largest_rows", 0))
        self._clean = int(state.get("clean_steps", 0))
        self._regrow_every = int(state.get("regrow_every", self._regrow_after))
        self._regrown = bool(state.get("regrown", False))


def make_runner(oom: str, regrow_after: int, *, model: torch.nn.Module, device: torch.device,
                sync_kind: str, run_micro: RunMicro,
                features: Sequence[Feature]) -> DirectRunner | SplitRunner:
    """The runner ``oom`` asks for: ``"split"``, ``"stop"`` (``"raise"`` is the same), or
    ``"auto"`` — split where the process group allows it, else stop.

    Raises:
        BigBatchError: an unknown mode or ``regrow_after``; ``"split"`` under FSDP2, or under DDP
            broadcasting buffers of a model that has some (their collectives cannot survive a
            micro-batch retried on one rank).
    """
    if oom not in ("auto", "split", "stop", "raise"):
        raise BigBatchError(f"oom must be 'auto', 'split' or 'stop', got {oom!r}")
    if isinstance(regrow_after, bool) or not isinstance(regrow_after, int) or regrow_after < 1:
        raise BigBatchError(f"oom_regrow_after must be a positive integer, got {regrow_after!r}")
    blocked = None
    if sync_kind == "fsdp2":
        blocked = "FSDP2's state cannot survive an out-of-memory error mid-backward"
    elif sync_kind == "ddp" and getattr(model, "broadcast_buffers", False) and any(
            True for _ in model.buffers()):
        blocked = ("DDP broadcasts the model's buffers in every forward, a collective that a "
                   "retried micro-batch on one rank would misalign (pass "
                   "broadcast_buffers=False to DistributedDataParallel to allow it)")
    if oom == "split" and blocked:
        raise BigBatchError(f"oom='split' is not available here: {blocked}; use oom='stop'")
    if oom == "split" or (oom == "auto" and blocked is None):
        return SplitRunner(model, device, run_micro, features, regrow_after)
    return DirectRunner(run_micro)


def _combine(parts: list[LossSum]) -> LossSum:
    """The pieces of one micro-batch as one :class:`LossSum` (detached sum, total count)."""
    total = parts[0].sum.detach()
    count = parts[0].count
    for ls in parts[1:]:
        total = total + ls.sum.detach().to(total.device)
        count = count + ls.count
    return LossSum(total, count)
