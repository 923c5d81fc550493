"""BatchNormalization: one pooled moving-statistics update per step, equal to the full batch's.

The layer sits on the inputs, so what it sees does not depend on other batch statistics; the
three micro-batches come from distributions with different means, so the variance between them
matters. The full batch's update is written here with numpy: Keras keeps the biased variance and
moves ``moving ← moving · momentum + batch statistic · (1 − momentum)``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import bigbatch.keras as bk
from bigbatch.errors import BigBatchError

MOMENTUM, ROWS, MICRO = 0.9, 12, 4


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(ROWS, 5)) + np.repeat([[0.0], [3.0], [-2.0]], MICRO, axis=0)
    return x, rng.normal(size=(ROWS, 2))


def bn_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((5,)),
                             keras.layers.BatchNormalization(momentum=MOMENTUM, name="bn"),
                             keras.layers.Dense(2)])


def moving(model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
    bn = model.get_layer("bn")
    return bn.moving_mean.numpy(), bn.moving_variance.numpy()


def fit(model: keras.Model, batch: int, epochs: int = 2) -> None:
    x, y = data()
    model.compile(keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0)


def expected(epochs: int = 2, average_variances: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, _ = data()
    mean, var = np.zeros(5), np.ones(5)
    if average_variances:  # gradient-accumulator's AccumBatchNormalization: mean of the v_k
        stat = np.mean([x[i:i + MICRO].var(0) for i in range(0, ROWS, MICRO)], axis=0)
    else:
        stat = x.var(0)
    for _ in range(epochs):
        mean = mean * MOMENTUM + x.mean(0) * (1 - MOMENTUM)
        var = var * MOMENTUM + stat * (1 - MOMENTUM)
    return mean, var


def close(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    return max(float(np.abs(p - q).max() / np.abs(q).max()) for p, q in zip(a, b))


def test_pooled_statistics_equal_the_full_batch(float64) -> None:
    full = bn_model()
    fit(full, ROWS)
    assert close(moving(full), expected()) < 1e-12  # the formula is Keras's own
    inner = bn_model()
    fit(bk.AccumulatingModel(inner, micro_batch=MICRO, batchnorm="pooled"), ROWS)
    assert close(moving(inner), expected()) < 1e-10
    assert close(expected(average_variances=True), expected()) > 1e-3  # AccumBN's rule


def test_unpooled_statistics_move_per_micro_batch(float64) -> None:
    inner = bn_model()
    fit(bk.AccumulatingModel(inner, micro_batch=MICRO, batchnorm="ignore"), ROWS)
    assert close(moving(inner), expected()) > 1e-3


def test_batchnorm_warns_by_default(float64) -> None:
    with pytest.warns(bk.BatchNormWarning, match="bn.*batchnorm='pooled'"):
        fit(bk.AccumulatingModel(bn_model(), micro_batch=MICRO), ROWS, epochs=1)


def test_renormalization_cannot_be_pooled(float64) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.BatchNormalization(renorm=True),
                              keras.layers.Dense(2)])
    with pytest.raises(BigBatchError, match="renorm=True"):
        fit(bk.AccumulatingModel(model, micro_batch=MICRO, batchnorm="pooled"), ROWS, epochs=1)
