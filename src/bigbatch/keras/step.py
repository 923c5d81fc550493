"""The rule, once per optimizer step: ``g = (Σ_k ∇ sum_k) / (Σ_k count_k)``.

Each micro-batch's backward runs on ``c · sum_k`` (``c`` a prescale, constant within the step, so
that fp16 gradients keep the range of a mean loss), summed into float32 (or wider) buffers. Once
per step :func:`finish` divides by ``c · N`` — ``N`` the items of every micro-batch, summed over
the replicas of a ``tf.distribute`` strategy — and hands the gradient to the optimizer once: its
``clipnorm``/``global_clipnorm``, learning-rate schedule, weight decay, EMA and loss scaling all see
one step with the full batch's gradient. A step with no items is skipped.

:class:`Accumulator` is the same rule for a hand-written ``tf.GradientTape`` loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from bigbatch.errors import BigBatchError, LossError

__all__ = ["Accumulator", "accumulator_dtype", "finish"]


class Slices(NamedTuple):
    """A sparse gradient (an embedding's) as the rows of every micro-batch, concatenated.

    Kept as rows, not summed into a dense buffer, because that is what a full-batch step hands
    the optimizer: one row per looked-up token. Keras's optimizers treat such rows one by one
    (Adam squares each row before summing; ``global_clipnorm`` measures the rows), so summing
    them first would give a different update than the full batch's.
    """

    values: tf.Tensor
    indices: tf.Tensor


def accumulator_dtype(variable: Any) -> tf.DType:
    """float32, or the variable's own dtype when wider (float64): never a 16-bit buffer."""
    dtype = tf.as_dtype(variable.dtype)
    return dtype if dtype.size > 4 else tf.float32


def start_sums(grads: Sequence[Any], variables: Sequence[Any]) -> list[Any]:
    """Buffers from the first micro-batch's gradients: dense in float32 (or wider), or rows."""
    sums: list[Any] = []
    for g, v in zip(grads, variables):
        dtype = accumulator_dtype(v)
        if isinstance(g, tf.IndexedSlices):
            sums.append(Slices(tf.cast(g.values, dtype), tf.cast(g.indices, tf.int64)))
        else:
            sums.append(tf.cast(g, dtype))
    return sums


def add_sums(sums: list[Any], grads: Sequence[Any]) -> list[Any]:
    """Adds one micro-batch's gradients: dense ones summed, sparse rows appended."""
    out: list[Any] = []
    for acc, g in zip(sums, grads):
        if isinstance(acc, Slices):
            out.append(Slices(tf.concat([acc.values, tf.cast(g.values, acc.values.dtype)], 0),
                              tf.concat([acc.indices, tf.cast(g.indices, tf.int64)], 0)))
        else:
            out.append(acc + tf.cast(tf.convert_to_tensor(g), acc.dtype))
    return out


def sum_invariants(sums: list[Any]) -> list[Any]:
    """``tf.while_loop`` shape invariants: appended rows grow along their first dimension."""
    return [Slices(tf.TensorShape([None, *s.values.shape[1:]]), tf.TensorShape([None]))
            if isinstance(s, Slices) else s.shape for s in sums]


def prescale(c: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """``c`` if set (> 0), else ``1 / count`` of the step's first micro-batch (1 if it is empty)."""
    return tf.where(c > 0, c, 1.0 / tf.maximum(tf.cast(count, tf.float64), 1.0))


def seed(optimizer: keras.Optimizer, c: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """What backward starts from: ``c`` times the optimizer's loss scale (fp16).

    ``tape.gradient(sum, variables, output_gradients=seed)`` is torch's ``sum.backward(c)``.
    """
    return optimizer.scale_loss(tf.cast(c, dtype))


def _scale(g: Any, factor: tf.Tensor) -> Any:
    if isinstance(g, tf.IndexedSlices):
        return tf.IndexedSlices(g.values * tf.cast(factor, g.values.dtype), g.indices,
                                g.dense_shape)
    return g * tf.cast(factor, g.dtype)


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def _apply(optimizer: keras.Optimizer, grads: list[tf.Tensor], variables: Sequence[Any],
           has_items: tf.Tensor) -> None:
    """``optimizer.apply`` unless the step has no items, once for all replicas.

    Keras's optimizer sums the replicas' gradients and clips each replica's before the sum; the
    gradient here is already global, so the first replica passes it and the others pass zeros:
    clipping sees the global gradient and the sum is exactly it.
    """
    def run() -> tf.Tensor:
        optimizer.apply(grads, variables)
        return tf.constant(True)

    if _replicas() == 1:
        tf.cond(has_items, run, lambda: tf.constant(False))
        return
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise BigBatchError("bigbatch.keras steps run inside strategy.run (a replica context), "
                            "not in the strategy's cross-replica scope")
    first = tf.equal(ctx.replica_id_in_sync_group, 0)
    grads = [_scale(g, tf.where(first, 1.0, 0.0)) for g in grads]

    def across(strategy: tf.distribute.Strategy, grads: list[Any], has_items: Any) -> None:
        ok = strategy.experimental_local_results(has_items)[0]

        def each() -> tf.Tensor:
            strategy.extended.call_for_each_replica(
                lambda *gs: optimizer.apply(list(gs), variables), args=tuple(grads))
            return tf.constant(True)

        tf.cond(ok, each, lambda: tf.constant(False))

    ctx.merge_call(across, args=(grads, has_items))


def finish(optimizer: keras.Optimizer, variables: Sequence[Any], sums: list[tf.Tensor],
           loss_sum: tf.Tensor, count: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Normalize the accumulated ``c · Σ_k ∇ sum_k`` by ``c · N`` and apply it, once.

    Under a ``tf.distribute`` strategy (called in its replica context) each replica's sums are
    divided by its own ``c`` and all-reduced with the loss sums and counts first.

    Returns:
        ``(loss, count)``: the step's exact mean loss ``Σ sum_k / N`` and ``N`` (float64), both
        global. With ``N = 0`` nothing is applied and the loss is 0.
    """
    c = tf.cast(c, tf.float64)
    loss_sum = tf.cast(loss_sum, tf.float64)
    count = tf.cast(count, tf.float64)
    grads = [tf.IndexedSlices(s.values, s.indices, tf.constant(list(v.shape), tf.int64))
             if isinstance(s, Slices) else s for s, v in zip(sums, variables)]
    if _replicas() > 1:
        grads = [_scale(g, 1.0 / c) for g in grads]
        ctx = tf.distribute.get_replica_context()
        grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
        loss_sum, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [loss_sum, count])
        norm = count
    else:
        norm = c * count
    has_items = count > 0
    grads = [_scale(g, 1.0 / tf.where(has_items, norm, 1.0)) for g in grads]
    _apply(optimizer, grads, variables, has_items)
    return loss_sum / tf.where(has_items, count, 1.0), count


class Accumulator:
    """Exact accumulation for a hand-written ``tf.GradientTape`` loop.

    ::

        acc = bigbatch.keras.Accumulator(optimizer, model.trainable_variables)
        for i, (x, y, w) in enumerate(micro_batches):
            with tf.GradientTape() as tape:
                total, count = bigbatch.keras.loss_sum(loss, y, model(x, training=True), w)
            acc.accumulate(tape, total, count)     # c·∇total into float32 buffers; count added
            if (i + 1) % K == 0:
                acc.apply()                        # g = Σ∇total / Σcount; one optimizer step
        acc.apply()                                # a short last cycle, divided by what it holds

    ``apply()`` with nothing accumulated (or only items of count 0) applies nothing. Works eagerly
    and inside ``tf.function``; under a ``tf.distribute`` strategy create it in the strategy's
    scope and call both methods inside ``strategy.run``: the buffers are per replica and the
    counts are summed over replicas.

    Args:
        optimizer: a Keras 3 optimizer (``clipnorm``, schedules, ``LossScaleOptimizer`` as usual).
        variables: the variables to train, as passed to ``tape.gradient``.

    Raises:
        BigBatchError: no variables.
    """

    def __init__(self, optimizer: keras.Optimizer, variables: Sequence[Any]) -> None:
        self.variables = list(variables)
        if not self.variables:
            raise BigBatchError("Accumulator needs the variables to train, e.g. "
                                "model.trainable_variables (build the model first)")
        self.optimizer = optimizer
        if not optimizer.built:
            optimizer.build(self.variables)
        local = {"trainable": False, "synchronization": tf.VariableSynchronization.ON_READ,
                 "aggregation": tf.VariableAggregation.SUM}
        self._sums = [tf.Variable(tf.zeros(v.shape, accumulator_dtype(v)), **local)
                      for v in self.variables]
        self._loss = tf.Variable(tf.constant(0.0, tf.float64), **local)
        self._count = tf.Variable(tf.constant(0.0, tf.float64), **local)
        self._c = tf.Variable(tf.constant(0.0, tf.float64), **local)

    def accumulate(self, tape: tf.GradientTape, loss_sum: tf.Tensor, count: Any) -> None:
        """Add one micro-batch: ``c · ∇loss_sum`` to the buffers and ``count`` to the count.

        Args:
            tape: the tape that recorded ``loss_sum``.
            loss_sum: the micro-batch's summed loss (``bigbatch.keras.loss_sum``'s first value,
                plus ``count ×`` any per-step regularization term).
            count: the items that ``loss_sum`` covers.

        Raises:
            LossError: ``loss_sum`` is not a scalar.
        """
        loss_sum = tf.convert_to_tensor(loss_sum)
        if loss_sum.shape.rank != 0:
            raise LossError(f"loss_sum must be a scalar (the summed loss), got shape "
                            f"{loss_sum.shape}; sum it, and pass the number of items as count")
        count = tf.cast(count, tf.float64)
        c = prescale(self._c.read_value(), count)
        self._c.assign(c)
        grads = tape.gradient(loss_sum, self.variables,
                              output_gradients=seed(self.optimizer, c, loss_sum.dtype),
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for buf, g in zip(self._sums, grads):
            buf.assign_add(tf.cast(tf.convert_to_tensor(g), buf.dtype))
        self._loss.assign_add(tf.cast(loss_sum, tf.float64))
        self._count.assign_add(count)

    def apply(self) -> dict[str, tf.Tensor]:
        """One optimizer step with ``Σ_k ∇ sum_k / Σ_k count_k``; then the buffers are emptied.

        Returns:
            ``{"loss": exact mean loss of the cycle, "count": items (float64, all replicas)}``.
        """
        sums = [b.read_value() for b in self._sums]
        loss, count = finish(self.optimizer, self.variables, sums, self._loss.read_value(),
                             self._count.read_value(), self._c.read_value())
        for buf in self._sums:
            buf.assign(tf.zeros_like(buf))
        for v in (self._loss, self._count, self._c):
            v.assign(tf.zeros_like(v))
        return {"loss": loss, "count": count}
