"""``AccumulatingModel``: ``model.fit`` on big batches, run as micro-batches, exactly.

Keep ``fit``'s ``batch_size`` at the batch your recipe asks for; wrap the model and say how many
rows fit in memory. Each ``fit`` step then runs its batch as micro-batches of ``micro_batch`` rows
(in a ``tf.while_loop``, one after the other), sums ``c · ∇ sum_k`` in float32 buffers and applies
``g = (Σ_k ∇ sum_k) / (Σ_k count_k)`` once (see :mod:`bigbatch.keras.step`). One ``fit`` step is
one optimizer step, so the learning-rate schedule, callbacks, logs and the progress bar count
optimizer steps, and an epoch's short last batch is one short, exact step.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import keras
import tensorflow as tf

from bigbatch.errors import BatchPlanError, BigBatchError

from .batchnorm import BatchNormPool, batchnorm_layers, warn_batchnorm
from .losses import loss_sum, resolve_loss
from .step import add_sums, finish, prescale, seed, start_sums, sum_invariants

__all__ = ["AccumulatingModel"]

_BATCHNORM = ("warn", "pooled", "ignore")


def _rows(x: Any) -> tf.Tensor:
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


def _slice(data: Any, start: tf.Tensor, size: tf.Tensor) -> Any:
    return tf.nest.map_structure(lambda t: None if t is None else t[start:start + size], data)


@keras.saving.register_keras_serializable(package="bigbatch")
class AccumulatingModel(keras.Model):
    """Wraps a Keras model so that ``fit`` takes each batch in micro-batches, exactly.

    ::

        model = bigbatch.keras.AccumulatingModel(model, micro_batch=8)
        model.compile(optimizer=keras.optimizers.AdamW(schedule, global_clipnorm=1.0),
                      loss="sparse_categorical_crossentropy")
        model.fit(x, y, sample_weight=w, batch_size=64)    # 64 rows a step, 8 at a time

    The loss of a step is Keras's loss on the whole batch (``Σ sum_k / Σ count_k``, with the
    counts of :func:`bigbatch.keras.loss_sum`: masks and sample weights as Keras reduces them)
    plus the model's regularization losses once; its gradient goes to the optimizer once.

    Args:
        model: a built or unbuilt Keras model (Sequential, functional or subclassed); its
            variables are trained in place, so save or use ``model`` itself afterwards.
        micro_batch: rows per forward/backward (per replica under ``tf.distribute``).
        accum_steps: or: cut each batch into this many micro-batches (the last may be shorter).
        batchnorm: ``"warn"`` (default) when the model has trainable BatchNormalization layers;
            ``"pooled"``: one moving-statistics update per step from the pooled micro-batch
            statistics (:mod:`bigbatch.keras.batchnorm`); ``"ignore"``.

    Raises:
        BatchPlanError: neither or both of ``micro_batch`` / ``accum_steps``, or not positive.
        BigBatchError: a Keras backend other than TensorFlow, ``model`` is not a Keras model,
            or ``batchnorm`` is unknown.
        LossError: at ``compile``: a loss without a count (see :func:`bigbatch.keras.loss_sum`).
    """

    def __init__(self, model: keras.Model, *, micro_batch: int | None = None,
                 accum_steps: int | None = None, batchnorm: str = "warn", **kwargs: Any) -> None:
        if keras.backend.backend() != "tensorflow":
            raise BigBatchError(f"AccumulatingModel runs on Keras's TensorFlow backend, not "
                                f"{keras.backend.backend()!r}: set KERAS_BACKEND=tensorflow")
        if not isinstance(model, keras.Model):
            raise BigBatchError(f"AccumulatingModel wraps a keras.Model, got "
                                f"{type(model).__name__}")
        if (micro_batch is None) == (accum_steps is None):
            raise BatchPlanError("give AccumulatingModel one of micro_batch= (rows per "
                                 "micro-batch) or accum_steps= (micro-batches per batch)")
        for name, value in (("micro_batch", micro_batch), ("accum_steps", accum_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise BatchPlanError(f"{name}={value!r} must be a positive integer")
        if batchnorm not in _BATCHNORM:
            raise BigBatchError(f"batchnorm={batchnorm!r}: use one of "
                                f"{', '.join(map(repr, _BATCHNORM))}")
        super().__init__(**kwargs)
        self.model = model
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.batchnorm = batchnorm
        self._loss_obj: Any = None
        self._loss_weight = 1.0

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``keras.Model.compile``; the loss must be one loss with a count (one output)."""
        bound = inspect.signature(keras.Model.compile).bind(self, *args, **kwargs)
        loss, weights = bound.arguments.get("loss"), bound.arguments.get("loss_weights")
        self._loss_obj = resolve_loss(loss)
        if weights is not None:
            flat = [w for w in tf.nest.flatten(weights) if w is not None]
            self._loss_weight = float(flat[0]) if len(flat) == 1 else 1.0
        super().compile(*args, **kwargs)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """Compile again when a saved model is loaded (``keras.saving.load_model``)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self) -> dict[str, Any]:
        return {"model": keras.saving.serialize_keras_object(self.model),
                "micro_batch": self.micro_batch, "accum_steps": self.accum_steps,
                "batchnorm": self.batchnorm, "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AccumulatingModel:
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        return cls(model, **config)

    # -- one optimizer step ------------------------------------------------------------------

    def _micro_rows(self, rows: tf.Tensor) -> tf.Tensor:
        if self.micro_batch is not None:
            return tf.constant(self.micro_batch, tf.int32)
        return tf.maximum((rows + self.accum_steps - 1) // self.accum_steps, 1)

    def train_step(self, data: Any) -> dict[str, Any]:
        if self._loss_obj is None:
            raise BigBatchError("compile the AccumulatingModel (not the model inside it) with a "
                                "loss before fit")
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = list(self.trainable_variables)
        layers = batchnorm_layers(self.model)
        if layers and self.batchnorm == "warn":
            warn_batchnorm(layers)
        pool = BatchNormPool(layers) if layers and self.batchnorm == "pooled" else None
        rows = _rows(x)
        micro = self._micro_rows(rows)
        steps = (rows + micro - 1) // micro

        def micro_step(i, c, stats):  # forward and backward of micro-batch i
            start = i * micro
            size = tf.minimum(micro, rows - start)
            xs, ys, ws = (_slice(t, start, size) for t in (x, y, sample_weight))
            with tf.GradientTape() as tape:
                y_pred = self(xs, training=True)
                s, d = loss_sum(self._loss_obj, ys, y_pred, ws)
                s = s * tf.cast(self._loss_weight, s.dtype)
                if self.losses:  # regularization: a per-step term, weighted by the items
                    s = s + tf.cast(d, s.dtype) * tf.cast(tf.add_n(self.losses), s.dtype)
            c = prescale(c, d)
            grads = tape.gradient(s, variables, output_gradients=seed(self.optimizer, c, s.dtype),
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            self.compute_metrics(xs, ys, y_pred, sample_weight=ws)
            if pool is not None:
                stats = pool.add(stats, size)
            return c, tf.cast(s, tf.float64), d, grads, stats

        def body(i, c, total, count, sums, stats):
            c, s, d, grads, stats = micro_step(i, c, stats)
            return i + 1, c, total + s, count + d, add_sums(sums, grads), stats

        # The first micro-batch runs before the loop: its gradients' kinds (dense, or an
        # embedding's per-token slices, kept as such as in a full-batch step) shape the loop.
        with pool.tracing() if pool is not None else contextlib.nullcontext():
            stats = pool.empty() if pool is not None else ()
            c, total, count, grads, stats = micro_step(tf.constant(0), tf.constant(0.0, tf.float64),
                                                       stats)
            sums = start_sums(grads, variables)
            loop = (tf.constant(1), c, total, count, sums, stats)
            _, c, total, count, sums, stats = tf.while_loop(
                lambda i, *_: i < steps, body, loop, parallel_iterations=1,
                shape_invariants=(*(t.shape for t in loop[:4]), sum_invariants(sums),
                                  tf.nest.map_structure(lambda t: t.shape, stats)))
        if pool is not None:
            pool.update(stats)
        loss, count = finish(self.optimizer, variables, sums, total, count, c)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss, sample_weight=rows)
        return self.get_metrics_result()

