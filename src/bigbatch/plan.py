"""Batch arithmetic: ``global_batch = micro_batch × accum_steps × world_size``.

:class:`BatchPlan` derives the missing size from any two of the first three, refuses combinations
that do not add up, groups a stream of micro-batches into optimizer-step cycles, and splits one big
batch into micro-batches (:mod:`bigbatch.batching`). It knows nothing of models or optimizers; the
one thing it asks torch.distributed is the default world size (:mod:`bigbatch.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .batching import batch_rows, slice_rows
from .distributed import world_size as default_world_size
from .errors import BatchPlanError

__all__ = ["BatchPlan", "Tail"]

T = TypeVar("T")
Tail = Literal["step", "drop"]
_RULE = "global_batch = micro_batch × accum_steps × world_size"


def _check_size(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BatchPlanError(f"{name} must be a positive integer, got {value!r}")
    if value <= 0:
        raise BatchPlanError(f"{name} must be a positive integer, got {value}")
    return value


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's batch is cut into micro-batches.

    Give any two of ``global_batch``, ``micro_batch`` and ``accum_steps``; the third is derived from
    ``global_batch = micro_batch × accum_steps × world_size``. Giving all three checks that they
    agree. ``world_size`` defaults to the torch.distributed world (1 without a process group).

    Args:
        global_batch: samples per optimizer step, summed over all processes.
        micro_batch: samples per forward/backward pass on one process.
        accum_steps: micro-batches per optimizer step on one process (K).
        world_size: number of data-parallel processes.
        tail: what to do with a last cycle shorter than ``accum_steps``: ``"step"`` takes an
            optimizer step on it, normalized by the items it actually holds; ``"drop"`` skips it.

    Raises:
        BatchPlanError: a size is not a positive integer, fewer than two sizes are given, the sizes
            disagree, or the global batch does not divide evenly.
    """

    global_batch: int = None  # type: ignore[assignment]  # derived in __post_init__
    micro_batch: int = None  # type: ignore[assignment]
    accum_steps: int = None  # type: ignore[assignment]
    world_size: int = field(default=None)  # type: ignore[assignment]
    tail: Tail = "step"

    def __post_init__(self) -> None:
        g = _check_size("global_batch", self.global_batch)
        m = _check_size("micro_batch", self.micro_batch)
        k = _check_size("accum_steps", self.accum_steps)
        w = _check_size("world_size", self.world_size)
        if w is None:
            w = default_world_size()
        if self.tail not in ("step", "drop"):
            raise BatchPlanError(f"tail must be 'step' or 'drop', got {self.tail!r}")
        given = sum(v is not None for v in (g, m, k))
        if given < 2:
            raise BatchPlanError(
                "give at least two of global_batch, micro_batch and accum_steps "
                f"(got global_batch={g}, micro_batch={m}, accum_steps={k}); rule: {_RULE}"
            )
        if g is None:
            assert m is not None and k is not None
            g = m * k * w
        elif m is None:
            assert k is not None
            if g % (k * w):
                raise BatchPlanError(
                    f"global_batch {g} is not divisible by accum_steps {k} × world {w} = {k * w}; "
                    f"rule: {_RULE}. Pick a global_batch that is a multiple of {k * w}"
                )
            m = g // (k * w)
        elif k is None:
            if g % (m * w):
                raise BatchPlanError(
                    f"global_batch {g} is not divisible by micro_batch {m} × world {w} = {m * w}; "
                    f"rule: {_RULE}. Pick a global_batch that is a multiple of {m * w}"
                )
            k = g // (m * w)
        if g != m * k * w:
            raise BatchPlanError(
                f"global_batch {g} is not micro_batch {m} × accum_steps {k} × world {w} = "
                f"{m * k * w}; rule: {_RULE}. Give two of the three and let the third be derived"
            )
        for name, value in (("global_batch", g), ("micro_batch", m), ("accum_steps", k)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "world_size", w)

    @property
    def local_batch(self) -> int:
        """Samples one process handles per optimizer step: ``micro_batch × accum_steps``."""
        return self.micro_batch * self.accum_steps

    def cycles(self, micro_batches: Iterable[T]) -> Iterator[list[T]]:
        """Group a stream of micro-batches into lists of ``accum_steps``, one list per step.

        The stream is read lazily, one cycle at a time. A last, shorter cycle is yielded when
        ``tail == "step"`` and dropped when ``tail == "drop"``.
        """
        cycle: list[T] = []
        for batch in micro_batches:
            cycle.append(batch)
            if len(cycle) == self.accum_steps:
                yield cycle
                cycle = []
        if cycle and self.tail == "step":
            yield cycle

    def split(self, batch: Any) -> list[Any]:
        """Split one batch along dimension 0 into micro-batches of ``micro_batch`` rows.

        ``batch`` is a tensor, or a mapping / tuple / list nesting tensors that all have the same
        number of rows; the structure is kept in every micro-batch. A batch of fewer than
        ``local_batch`` rows gives fewer micro-batches (the last one may be short).

        Raises:
            BatchPlanError: the batch holds more rows than one cycle (``local_batch``), no rows,
                tensors of different row counts, or a value that is not a tensor.
        """
        rows = batch_rows(batch, "batch")
        if rows is None:
            raise BatchPlanError("cannot split a batch that holds no tensors")
        if rows == 0:
            raise BatchPlanError("cannot split a batch with 0 rows")
        if rows > self.local_batch:
            raise BatchPlanError(
                f"batch of {rows} rows is more than one cycle of micro_batch {self.micro_batch} × "
                f"accum_steps {self.accum_steps} = {self.local_batch} rows; give one cycle's rows"
            )
        starts = range(0, rows, self.micro_batch)
        return [slice_rows(batch, s, min(s + self.micro_batch, rows)) for s in starts]


