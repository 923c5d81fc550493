"""BatchNormalization under accumulation: a warning, or one pooled moving-statistics update.

Each forward of a ``BatchNormalization`` layer in training normalizes with its micro-batch's own
mean and variance, so the gradient of a model with such layers is not the full batch's. Its moving
statistics, left alone, move once per micro-batch, towards that micro-batch's statistics.
:class:`BatchNormPool` keeps them still during a step, pools what each micro-batch gave and makes
the ONE update a full-batch forward would have made from the same inputs. Micro-batch k gives per
channel its count ``n_k``, mean ``m_k`` and (biased, as Keras keeps it) variance ``v_k``; pooled
with the parallel-variance formula (Chan, Golub & LeVeque):

    N = Σ n_k,   M = Σ n_k m_k / N,   V = Σ n_k (v_k + (m_k − M)²) / N

The ``(m_k − M)²`` term is the variance between micro-batches, which averaging the ``v_k`` drops.
Then, as Keras does for one batch: ``moving ← moving · momentum + stat · (1 − momentum)``. Under
``tf.distribute`` the sums are all-reduced first, so N spans the replicas.

How the statistics are read: while the step's micro-batches are traced, each pooled layer's
``momentum`` is 0, so its own update writes exactly that micro-batch's mean and variance into its
moving statistics; they are read back, pooled, and the moving statistics restored and updated
once with the layer's momentum. ``n_k`` is taken as the micro-batch's rows (every micro-batch of
a step has the same other dimensions), which is the count unless the layer's input has a mask.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

from bigbatch.errors import BigBatchError

__all__ = ["BatchNormPool", "BatchNormWarning", "batchnorm_layers"]


class BatchNormWarning(UserWarning):
    """The model normalizes with batch statistics, which micro-batches change."""


def batchnorm_layers(model: Any) -> list[keras.layers.BatchNormalization]:
    """The trainable ``BatchNormalization`` layers of ``model`` and of the models inside it."""
    found: list[keras.layers.BatchNormalization] = []

    def walk(layer: Any) -> None:
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable and layer not in found:
                found.append(layer)
        for sub in getattr(layer, "layers", ()):
            walk(sub)

    walk(model)
    return found


def warn_batchnorm(layers: list[keras.layers.BatchNormalization]) -> None:
    names = ", ".join(layer.name for layer in layers)
    warnings.warn(
        f"BatchNormalization layers ({names}) normalize each micro-batch with its own statistics, "
        "so the gradient is not the full batch's, and move their moving statistics once per "
        "micro-batch. Pass batchnorm='pooled' for one exact moving-statistics update per step, "
        "replace them with LayerNormalization/GroupNormalization to be exact, or "
        "batchnorm='ignore'", BatchNormWarning, stacklevel=3)


class BatchNormPool:
    """Pools the moving statistics of ``layers`` over one step's micro-batches (see module doc).

    Used by :class:`~bigbatch.keras.AccumulatingModel` with ``batchnorm="pooled"`` inside its
    traced step: :meth:`tracing` around the micro-batch loop, :meth:`empty` for its start,
    :meth:`add` after each micro-batch's forward, :meth:`update` after the loop.

    Raises:
        BigBatchError: a layer uses batch renormalization or synchronized statistics.
    """

    def __init__(self, layers: list[keras.layers.BatchNormalization]) -> None:
        odd = [layer.name for layer in layers if layer.renorm or layer.synchronized]
        if odd:
            raise BigBatchError(f"batchnorm='pooled' cannot pool BatchNormalization layers with "
                                f"renorm=True or synchronized=True ({', '.join(odd)}); use "
                                "batchnorm='warn' or plain BatchNormalization")
        self.layers = layers
        self._momentum = [float(layer.momentum) for layer in layers]
        self._before: list[tuple[tf.Tensor, tf.Tensor]] = []

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Momentum 0 while the micro-batch loop is traced: each forward writes its statistics."""
        try:
            for layer in self.layers:
                layer.momentum = 0.0
            yield
        finally:
            for layer, momentum in zip(self.layers, self._momentum):
                layer.momentum = momentum

    def empty(self) -> tuple[Any, ...]:
        """Reads the moving statistics as they are before the step; returns empty pools."""
        self._before = [(tf.identity(layer.moving_mean.value),
                         tf.identity(layer.moving_variance.value)) for layer in self.layers]
        zero = tf.constant(0.0, tf.float64)
        return tuple((zero, tf.zeros(layer.moving_mean.shape, tf.float64),
                      tf.zeros(layer.moving_mean.shape, tf.float64)) for layer in self.layers)

    def add(self, pools: Any, rows: tf.Tensor) -> tuple[Any, ...]:
        """Pools the micro-batch whose forward just ran (``rows`` of it): count, mean, ``N·V``."""
        n = tf.cast(rows, tf.float64)
        out = []
        for layer, (count, mean, m2) in zip(self.layers, pools):
            m = tf.cast(layer.moving_mean.value, tf.float64)
            v = tf.cast(layer.moving_variance.value, tf.float64)
            total = count + n
            delta = m - mean
            out.append((total, mean + delta * (n / total),
                        m2 + v * n + tf.square(delta) * (count * n / total)))
        return tuple(out)

    def update(self, pools: Any) -> None:
        """One update per layer: ``moving ← moving · momentum + pooled · (1 − momentum)``."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for layer, momentum, before, (count, mean, m2) in zip(
                self.layers, self._momentum, self._before, pools):
            if replicas > 1:  # sums over replicas: N, Σ n·m, Σ (M2 + n·m²)
                ctx = tf.distribute.get_replica_context()
                count, first, second = ctx.all_reduce(
                    tf.distribute.ReduceOp.SUM, [count, count * mean, m2 + count * mean * mean])
                mean = first / count
                var = second / count - mean * mean
            else:
                var = m2 / count
            for variable, old, stat in ((layer.moving_mean, before[0], mean),
                                        (layer.moving_variance, before[1], var)):
                stat = tf.cast(stat, old.dtype)
                variable.assign(old * momentum + stat * (1.0 - momentum))
