"""A Keras loss as a sum and a count.

Keras reduces a loss to a mean whose denominator depends on the reduction, the sample weights and
the mask, never on the predictions. :func:`loss_sum` returns the numerator and the denominator
apart, so that Keras's value is ``sum / count``:

    sum   = Σ_i w_i · l_i          l: the loss's per-item values (``loss.call``), w: sample weight
                                    × mask (1 where there is neither)
    count = Σ_i mask_i, or the number of values without a mask    ("sum_over_batch_size", "mean")
          = Σ_i w_i,    or the number of values without either      ("mean_with_sample_weight")

Over K micro-batches the full batch's loss is then ``Σ_k sum_k / Σ_k count_k``: padding that the
mask removes does not count, and a micro-batch counts by its items, not as 1/K. With the default
``"sum_over_batch_size"``, a zero sample weight (not a mask) still counts in the denominator, in
Keras's full-batch loss and here alike; use a mask or ``reduction="mean_with_sample_weight"`` for a
mean over the weighted items.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from bigbatch.errors import LossError

__all__ = ["loss_sum", "resolve_loss"]

_MEANS = ("sum_over_batch_size", "mean")
_SUPPORTED = (*_MEANS, "mean_with_sample_weight")


def resolve_loss(identifier: Any) -> keras.losses.Loss | Callable[..., Any]:
    """The loss object behind what ``compile(loss=...)`` was given: one loss, for one output.

    Raises:
        LossError: no loss, several losses, the shape-dependent name ``"crossentropy"``, or a
            reduction that is not a mean (``"sum"``, ``"none"``).
    """
    if isinstance(identifier, Mapping | Sequence) and not isinstance(identifier, str):
        values = list(identifier.values() if isinstance(identifier, Mapping) else identifier)
        values = [v for v in values if v is not None]
        if len(values) != 1:
            raise LossError(
                f"bigbatch.keras accumulates one loss; compile was given {len(values)}. Combine "
                "the outputs' losses into one keras.losses.Loss, or use bigbatch.keras.Accumulator "
                "in your own loop")
        identifier = values[0]
    if identifier is None:
        raise LossError("the model was compiled without a loss: pass compile(loss=...)")
    if isinstance(identifier, str) and identifier.lower() in ("crossentropy", "ce"):
        raise LossError(f"loss={identifier!r} picks its kind from the data; name it, e.g. "
                        "'sparse_categorical_crossentropy'")
    loss = keras.losses.get(identifier) if isinstance(identifier, str | dict) else identifier
    reduction = getattr(loss, "reduction", "sum_over_batch_size")
    if reduction not in _SUPPORTED:
        raise LossError(
            f"loss reduction {reduction!r} is not a mean over items, so it has no count to "
            f"normalize by; use one of {', '.join(map(repr, _SUPPORTED))}")
    return loss


def _same_rank(a: tf.Tensor, b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Keras's rule for pairing tensors whose ranks differ by one trailing dimension of size 1."""
    ra, rb = a.shape.rank, b.shape.rank
    if ra == rb + 1 and a.shape[-1] == 1:
        return (a, tf.expand_dims(b, -1)) if rb == 1 else (tf.squeeze(a, -1), b)
    if rb == ra + 1 and b.shape[-1] == 1:
        return (tf.expand_dims(a, -1), b) if ra == 1 else (a, tf.squeeze(b, -1))
    return a, b


def _values(loss: Any, y_true: Any, y_pred: tf.Tensor) -> tuple[tf.Tensor, tf.DType]:
    if isinstance(loss, keras.losses.Loss):
        dtype = tf.as_dtype(loss.dtype)
        y_true = tf.nest.map_structure(lambda t: tf.cast(t, dtype), y_true)
        return loss.call(y_true, tf.cast(y_pred, dtype)), dtype
    dtype = tf.as_dtype(keras.config.floatx())
    y_true, y_pred = _same_rank(tf.cast(y_true, dtype), tf.cast(y_pred, dtype))
    return loss(y_true, y_pred), dtype


def loss_sum(loss: Any, y_true: Any, y_pred: tf.Tensor,
             sample_weight: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """The sum and the count of a Keras loss on one batch; Keras's value is ``sum / count``.

    The formulas are in this module's docstring. A mask on ``y_pred`` (Keras's ``_keras_mask``,
    set by ``Embedding(mask_zero=True)`` or ``Masking``) takes padding out of both.

    Args:
        loss: a ``keras.losses.Loss``, a loss function ``f(y_true, y_pred)`` returning per-item
            values (reduced as ``"sum_over_batch_size"``), or a name such as ``"mse"``.
        y_true: the targets.
        y_pred: the model's output.
        sample_weight: optional weights, broadcastable like Keras's.

    Returns:
        ``(sum, count)``: ``sum`` in the loss's dtype (differentiable), ``count`` in float64.

    Raises:
        LossError: the loss returns one number per batch instead of per-item values, or its
            reduction is not a mean (see :func:`resolve_loss`).
    """
    loss = resolve_loss(loss)
    mask = getattr(y_pred, "_keras_mask", None)
    values, dtype = _values(loss, y_true, y_pred)
    if values.shape.rank == 0:
        raise LossError(
            f"the loss {getattr(loss, 'name', loss)!r} returned one number per batch; bigbatch "
            "needs per-item values (a keras.losses.Loss whose call() does not reduce the batch)")
    out_mask = getattr(values, "_keras_mask", None)
    if mask is not None and out_mask is not None:
        mask = tf.logical_and(tf.cast(mask, tf.bool), tf.cast(out_mask, tf.bool))
    elif out_mask is not None:
        mask = out_mask
    weight = None
    if mask is not None:
        weight = tf.cast(mask, dtype)
    if sample_weight is not None:
        sw = tf.cast(sample_weight, dtype)
        if weight is not None:
            weight, sw = _same_rank(weight, sw)
            sw = sw * weight
        weight = sw
    if weight is not None:
        values, weight = _same_rank(values, weight)
        total = tf.reduce_sum(values * weight)
    else:
        total = tf.reduce_sum(values)
    items = tf.cast(tf.size(values), tf.float64)
    reduction = getattr(loss, "reduction", "sum_over_batch_size")
    if reduction in _MEANS:
        count = items if mask is None else tf.reduce_sum(tf.cast(mask, tf.float64))
    else:
        count = items if weight is None else tf.reduce_sum(tf.cast(weight, tf.float64))
    return total, tf.stop_gradient(count)
