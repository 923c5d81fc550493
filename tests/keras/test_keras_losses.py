"""``loss_sum``: Keras's loss value is ``sum / count`` for every reduction, weighting and mask; and
``import bigbatch.keras`` loads nothing of the PyTorch side."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import bigbatch.keras as bk
from bigbatch.errors import LossError

RNG = np.random.default_rng(3)
Y_TRUE = RNG.integers(0, 5, size=(4, 6))
LOGITS = RNG.normal(size=(4, 6, 5))
MASK = RNG.random((4, 6)) > 0.4
WEIGHTS = {"none": None, "rows": RNG.random((4, 1)) + 0.5,
           "tokens": RNG.random((4, 6)) * (RNG.random((4, 6)) > 0.2)}


def logits(masked: bool) -> tf.Tensor:
    t = tf.constant(LOGITS)
    if masked:
        t._keras_mask = tf.constant(MASK)  # as Embedding(mask_zero=True) leaves it
    return t


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean", "mean_with_sample_weight"])
def test_sum_over_count_is_keras_loss(float64, reduction: str, weights: str, masked: bool) -> None:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    w = WEIGHTS[weights]
    total, count = bk.loss_sum(loss, Y_TRUE, logits(masked), w)
    expected = float(loss(Y_TRUE, logits(masked), sample_weight=w))
    assert float(total) / float(count) == pytest.approx(expected, rel=1e-12)
    if masked and reduction != "mean_with_sample_weight":
        assert float(count) == MASK.sum()  # padding does not count


def test_functions_and_names_are_means_over_items(float64) -> None:
    y, p = RNG.normal(size=(5, 3)), tf.constant(RNG.normal(size=(5, 3)))
    for loss in ("mse", keras.losses.mean_absolute_error):
        total, count = bk.loss_sum(loss, y, p)
        assert float(count) == 5
        expected = float(keras.losses.get(loss)(y, p).numpy().mean())
        assert float(total) / 5 == pytest.approx(expected, rel=1e-12)


def test_a_loss_that_reduces_the_batch_is_refused(float64) -> None:
    class BatchMean(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return tf.reduce_mean(tf.square(y_true - y_pred))

    with pytest.raises(LossError, match="one number per batch"):
        bk.loss_sum(BatchMean(), np.zeros((2, 2)), tf.zeros((2, 2), tf.float64))


@pytest.mark.slow
def test_importing_the_keras_port_loads_no_torch() -> None:
    code = ("import sys, bigbatch.keras; print(sorted(m for m in sys.modules if m == 'torch' or "
            "m.startswith('torch.') or (m.startswith('bigbatch') and m not in "
            "('bigbatch', 'bigbatch.errors') and not m.startswith('bigbatch.keras'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
