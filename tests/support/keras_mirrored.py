"""Run by tests/keras/test_keras_distributed.py in its own process: two logical CPU devices must be
configured before TensorFlow starts its runtime, which a pytest process has already done.

Prints one JSON line of distances (float64, see keras_reference.distance):
``mirrored`` — AccumulatingModel under MirroredStrategy vs on one device (Adam; ``mirrored_sgd``:
SGD with momentum, which unlike Adam would show a wrong scale of the gradient);
``keras_mirrored`` — Keras's own full-batch fit under MirroredStrategy vs on one device;
``tape`` — the Accumulator inside ``strategy.run`` vs on one device;
``pooled_bn`` — pooled BatchNorm moving statistics under MirroredStrategy vs one device.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from keras_reference import batches, distance, padded_tokens, token_model  # noqa: E402

import bigbatch.keras as bk  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
keras.config.set_floatx("float64")
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
X, Y, _ = padded_tokens(22)
START = token_model().get_weights()


def adam() -> keras.Optimizer:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=1, decay_rate=0.7)
    return keras.optimizers.Adam(schedule, global_clipnorm=0.25)


def sce() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sgd() -> keras.Optimizer:  # unlike Adam, it sees a wrong scale of the gradient
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.7)
    return keras.optimizers.SGD(schedule, momentum=0.5, global_clipnorm=0.3)


def fit(wrap: bool, optimizer=adam) -> list[np.ndarray]:
    inner = token_model()
    model = bk.AccumulatingModel(inner, micro_batch=3) if wrap else inner
    model.compile(optimizer(), loss=sce())
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return inner.get_weights()


def tape_loop(strategy: tf.distribute.Strategy | None) -> list[np.ndarray]:
    model = token_model()
    acc = bk.Accumulator(sgd(), model.trainable_variables)

    def micro(x, y):
        with tf.GradientTape() as tape:
            total, count = bk.loss_sum(sce(), y, model(x, training=True))
            total += tf.cast(count, total.dtype) * tf.add_n(model.losses)
        acc.accumulate(tape, total, count)

    @tf.function
    def step(x, y):
        return strategy.run(micro, args=(x, y)) if strategy else micro(x, y)

    @tf.function
    def apply():
        return strategy.run(acc.apply) if strategy else acc.apply()

    for i, rows in enumerate(batches(len(X), 4)):  # micro-batches of 4 rows, 2 per step
        x, y = tf.constant(X[rows]), tf.constant(Y[rows])
        if strategy:  # each replica takes its half of the micro-batch
            x, y = (strategy.experimental_distribute_values_from_function(
                lambda ctx, t=t: tf.split(t, [len(t) // 2, len(t) - len(t) // 2])[
                    ctx.replica_id_in_sync_group]) for t in (x, y))
        step(x, y)
        if i % 2 == 1:
            apply()
    apply()
    return model.get_weights()


def pooled_bn() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 5)) + np.repeat([[0.0], [3.0], [-2.0]], 4, axis=0)
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)), keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Dense(2)])
    model = bk.AccumulatingModel(inner, micro_batch=2, batchnorm="pooled")
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, rng.normal(size=(12, 2)), batch_size=12, epochs=2, shuffle=False, verbose=0)
    bn = inner.get_layer("bn")
    return [bn.moving_mean.numpy(), bn.moving_variance.numpy()]


def main() -> None:
    one, one_sgd, keras_one, tape_one = fit(True), fit(True, sgd), fit(False), tape_loop(None)
    bn_one = pooled_bn()
    with STRATEGY.scope():
        mirrored, mirrored_sgd, keras_mirrored = fit(True), fit(True, sgd), fit(False)
        tape_mirrored = tape_loop(STRATEGY)
        bn_mirrored = pooled_bn()
    bn_start = [np.zeros(5), np.ones(5)]
    print(json.dumps({
        "mirrored": distance(mirrored, one, START),
        "mirrored_sgd": distance(mirrored_sgd, one_sgd, START),
        "keras_mirrored": distance(keras_mirrored, keras_one, START),
        "tape": distance(tape_mirrored, tape_one, START),
        "pooled_bn": distance(bn_mirrored, bn_one, bn_start),
    }))


if __name__ == "__main__":
    main()
