"""What one optimizer step did: :class:`StepStats`."""

from __future__ import annotations

from dataclasses import dataclass

from ..noise import NoiseEstimate

__all__ = ["StepStats"]


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
