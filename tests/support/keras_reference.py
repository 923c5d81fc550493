"""Independent references for the Keras tests: plain TensorFlow, no bigbatch.

``full_batch_fit`` is what one big batch does: for every batch ``fit`` would take (in order), one
forward of the whole batch, the token loss written out by hand — softmax cross-entropy summed over
the real (non-padding) tokens and divided by their count, or by their summed weights — plus the
regularization losses, one ``tape.gradient``, one ``optimizer.apply_gradients`` (Keras's optimizer:
its clipping and learning-rate schedule are the framework's, applied once per batch). The
gradients go to the optimizer as ``tape.gradient`` returns them, as ``fit`` hands them over: an
embedding's as one row per looked-up token (``tf.IndexedSlices``), which Keras's Adam and
``global_clipnorm`` treat row by row.

The peers' rules, written from their documentation and code (the comments say which):
``seed_manual_loop`` and ``MeanOfMeansModel``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

VOCAB, LENGTH = 11, 7


def padded_tokens(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows of very uneven lengths (the first six hold one token), padded with 0.

    Returns ``x``, next-token targets ``y`` and per-token weights ``w`` (1 on real tokens, 0 on
    padding, and 2 on every third real token, so that weights are not just a mask).
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, LENGTH + 1, rows)
    lengths[:6] = 1
    x = np.zeros((rows, LENGTH), "int64")
    for i, n in enumerate(lengths):
        x[i, :n] = rng.integers(1, VOCAB, n)
    y = (x * 3 + 1) % VOCAB
    w = (x > 0).astype("float64")
    w[:, ::3] *= 2.0
    return x, y, w


def token_model(seed: int = 0, regularize: bool = True) -> keras.Model:
    """Embedding (mask_zero: padding is masked out of the loss) → tanh Dense → logits."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((LENGTH,), dtype="int64")
    h = keras.layers.Embedding(VOCAB, 8, mask_zero=True)(tokens)
    reg = keras.regularizers.L2(1e-3) if regularize else None
    h = keras.layers.Dense(16, activation="tanh", kernel_regularizer=reg)(h)
    return keras.Model(tokens, keras.layers.Dense(VOCAB)(h))


def distance(weights: list[np.ndarray], reference: list[np.ndarray],
             start: list[np.ndarray]) -> float:
    """Worst relative distance over tensors: max abs(w − ref) / max abs(ref − start)."""
    return max(float(np.abs(w - r).max() / np.abs(r - s).max())
               for w, r, s in zip(weights, reference, start))


def token_loss(model: keras.Model, x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None,
               weighted: bool = False) -> tf.Tensor:
    """Mean token cross-entropy over the real tokens (``x > 0``) of the batch, by hand."""
    logits = model(x, training=True)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.constant(y), logits)
    real = tf.cast(x > 0, ce.dtype)
    weight = real if w is None else real * tf.constant(w, ce.dtype)
    denominator = tf.reduce_sum(weight if weighted else real)
    loss = tf.reduce_sum(ce * weight) / denominator
    if model.losses:
        loss = loss + tf.add_n(model.losses)
    return loss


def batches(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def full_batch_fit(model: keras.Model, optimizer: keras.Optimizer, x: np.ndarray, y: np.ndarray,
                   w: np.ndarray | None = None, *, batch: int, epochs: int = 1,
                   weighted: bool = False) -> list[float]:
    """Train as ``fit(batch_size=batch, shuffle=False)`` would with one big batch per step.

    Returns:
        The global gradient norm of every step (before clipping).
    """
    norms = []
    variables = model.trainable_variables
    for _ in range(epochs):
        for rows in batches(len(x), batch):
            with tf.GradientTape() as tape:
                loss = token_loss(model, x[rows], y[rows], None if w is None else w[rows],
                                  weighted)
            grads = tape.gradient(loss, variables)
            norms.append(float(tf.linalg.global_norm(grads)))
            optimizer.apply_gradients(zip(grads, variables))
    return norms


def seed_manual_loop(model: keras.Model, optimizer: keras.Optimizer, x: np.ndarray,
                     y: np.ndarray, *, micro: int, accumulation_steps: int,
                     epochs: int = 1) -> None:
    """The seed document's tf.GradientTape loop (section 3.2.1): sum the micro-batches' gradients
    of their own mean loss, divide by ``accumulation_steps``, apply every ``accumulation_steps``
    micro-batches; the accumulator restarts each epoch."""
    variables = model.trainable_variables
    for _ in range(epochs):
        acc = [tf.zeros_like(v) for v in variables]
        for i, rows in enumerate(batches(len(x), micro)):
            with tf.GradientTape() as tape:
                loss = token_loss(model, x[rows], y[rows])
            acc = [a + g for a, g in zip(acc, tape.gradient(loss, variables))]
            if (i + 1) % accumulation_steps == 0:
                optimizer.apply_gradients(zip([a / accumulation_steps for a in acc], variables))
                acc = [tf.zeros_like(v) for v in variables]


class MeanOfMeansModel(keras.Model):
    """The rule of gradient-accumulator's ``GradientAccumulateModel`` (v0.5.2, ``train_step``):
    each micro-batch's compiled (mean) loss divided by ``accum_steps``, its gradients added into
    variables, ``apply_gradients`` when a counter that runs across epochs reaches ``accum_steps``.
    Reproduced here because the package pins numpy<=1.23.2 and TensorFlow 2.13 and so does not
    install beside this project's dependencies."""

    def __init__(self, model: keras.Model, accum_steps: int) -> None:
        super().__init__()
        self.inner = model
        self.accum_steps = accum_steps
        self.acc = [tf.Variable(tf.zeros_like(v), trainable=False)
                    for v in model.trainable_variables]
        self.counter = tf.Variable(0, trainable=False)

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self.counter.assign_add(1)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight) / self.accum_steps
        variables = self.inner.trainable_variables
        for a, g in zip(self.acc, tape.gradient(loss, variables)):
            a.assign_add(tf.convert_to_tensor(g))

        def apply() -> tf.Tensor:
            self.optimizer.apply_gradients(zip([a.value() for a in self.acc], variables))
            self.counter.assign(0)
            for a in self.acc:
                a.assign(tf.zeros_like(a))
            return tf.constant(True)

        tf.cond(tf.equal(self.counter, self.accum_steps), apply, lambda: tf.constant(False))
        return {"loss": loss * self.accum_steps}
