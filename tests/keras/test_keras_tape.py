"""``bigbatch.keras.Accumulator`` in a hand-written ``tf.GradientTape`` loop, against one big batch.

The loop of the seed document (section 3.2.1), with the sum and the count: 22 padded rows in
micro-batches of 3, K = 3 (so 3 cycles of 9, 9 and 4 rows: the last one short), Adam with a
schedule and ``global_clipnorm``. The Accumulator's buffers are dense: an embedding's gradient is
summed into a dense buffer, so the reference hands the optimizer dense gradients too.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras_reference import batches, distance, padded_tokens, token_loss, token_model

import bigbatch.keras as bk
from bigbatch.errors import BigBatchError, LossError

MICRO, K = 3, 3


def adam() -> keras.Optimizer:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.7)
    return keras.optimizers.Adam(schedule, global_clipnorm=0.25)


def dense_full_batch(x, y) -> list[np.ndarray]:
    model = token_model()
    optimizer = adam()
    for rows in batches(len(x), MICRO * K):
        with tf.GradientTape() as tape:
            loss = token_loss(model, x[rows], y[rows])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip([tf.convert_to_tensor(g) for g in grads],
                                      model.trainable_variables))
    return model.get_weights()


def accumulate(model, acc, loss, xb, yb) -> None:
    with tf.GradientTape() as tape:
        total, count = bk.loss_sum(loss, yb, model(xb, training=True))
        total += tf.cast(count, total.dtype) * tf.add_n(model.losses)  # regularization, per step
    acc.accumulate(tape, total, count)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_tape_loop_equals_one_big_batch(float64, compiled: bool) -> None:
    x, y, _ = padded_tokens(22)
    start = token_model().get_weights()
    full = dense_full_batch(x, y)
    model = token_model()
    acc = bk.Accumulator(adam(), model.trainable_variables)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step = tf.function(accumulate) if compiled else accumulate
    finish = tf.function(acc.apply) if compiled else acc.apply
    for i, rows in enumerate(batches(len(x), MICRO)):
        step(model, acc, loss, tf.constant(x[rows]), tf.constant(y[rows]))
        if (i + 1) % K == 0:
            finish()
    stats = finish()  # the short last cycle
    assert int(acc.optimizer.iterations) == 3
    assert float(stats["count"]) == (x[18:] > 0).sum()
    assert distance(model.get_weights(), full, start) < 1e-10


def test_apply_with_nothing_accumulated_steps_nothing(float64) -> None:
    model = token_model()
    acc = bk.Accumulator(adam(), model.trainable_variables)
    before = model.get_weights()
    assert float(acc.apply()["count"]) == 0
    assert int(acc.optimizer.iterations) == 0
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))


def test_bad_input_is_refused(float64) -> None:
    with pytest.raises(BigBatchError, match="needs the variables to train"):
        bk.Accumulator(adam(), [])
    model = token_model()
    acc = bk.Accumulator(adam(), model.trainable_variables)
    x, y, _ = padded_tokens(3)
    with tf.GradientTape() as tape:
        per_token = tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x))
    with pytest.raises(LossError, match="must be a scalar"):
        acc.accumulate(tape, per_token, 3)
