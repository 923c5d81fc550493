"""Exception types for user mistakes.

Every error bigbatch raises for something the user can fix derives from :class:`BigBatchError`, so a
command line (or a user's own script) can catch it once and print its one-line message.
"""

from __future__ import annotations

__all__ = ["BatchPlanError", "BigBatchError", "LossError", "NonFiniteError"]


class BigBatchError(ValueError):
    """A mistake in how bigbatch was called; the message says what is wrong and how to fix it."""


class BatchPlanError(BigBatchError):
    """The batch sizes do not satisfy ``global_batch = micro_batch × accum_steps × world_size``."""


class LossError(BigBatchError):
    """A loss function returned something the engine cannot normalize exactly."""


class NonFiniteError(BigBatchError):
    """A loss or gradient was NaN or infinite and the engine was told to stop
    (``on_nonfinite="stop"``)."""
