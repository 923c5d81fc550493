"""Exact accumulation inside the trainers people already use, one module per trainer.

=============================================  ===============================================
``bigbatch.integrations.transformers``         ``ExactTrainer``: a drop-in ``transformers.Trainer``
``bigbatch.integrations.accelerate``           ``ExactAccumulation(accelerator, model).backward``
``bigbatch.integrations.lightning``            ``ExactAccumulation`` callback + ``exact_loss``
``bigbatch.integrations.deepspeed``            ``ExactEngine`` around ``engine.backward``/``step``
=============================================  ===============================================

Each module imports its trainer only when it is imported itself (``import bigbatch`` and
``import bigbatch.integrations`` load none of them). They share one rule
(:mod:`bigbatch.integrations._rule`): every micro-batch's loss is a
:class:`~bigbatch.LossSum`; the trainer backpropagates ``c · sum`` with its own divisor and
gradient sync; once per optimizer step, after the cycle's last backward and before the trainer
clips, the gradient is rescaled so that it becomes ``Σ_k ∇sum_k / Σ_k count_k`` with the counts
summed over micro-batches and ranks. See ``docs/integrations.md``.
"""

from __future__ import annotations

from ..errors import BigBatchError

__all__ = ["IntegrationError"]


class IntegrationError(BigBatchError):
    """A trainer set up in a way the integration cannot make exact; the message names the fix."""
