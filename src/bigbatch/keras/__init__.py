"""bigbatch for Keras 3 on TensorFlow: exact gradient accumulation in ``fit`` and in tape loops.

Every loss is a sum and a count; once per optimizer step the summed gradient is divided by the
total count, once::

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)

- :class:`AccumulatingModel` — wrap a model; ``fit`` takes each batch in micro-batches.
- :class:`Accumulator` — the same rule for a hand-written ``tf.GradientTape`` loop.
- :func:`loss_sum` — a Keras loss on one batch as ``(sum, count)``.

This subpackage imports TensorFlow and Keras and nothing of bigbatch's PyTorch side.
"""

from __future__ import annotations

from .batchnorm import BatchNormWarning
from .losses import loss_sum
from .model import AccumulatingModel
from .step import Accumulator

__all__ = [
    "AccumulatingModel",
    "Accumulator",
    "BatchNormWarning",
    "loss_sum",
]
