"""What the background notes say about Keras's own accumulation, checked on the installed Keras.

- ``gradient_accumulation_steps`` advances a learning-rate schedule per micro-step, although
  ``optimizer.iterations`` counts optimizer steps;
- it updates the weights' EMA (``use_ema``) per micro-step;
- an optimizer wrapper that hands the inner optimizer a zero gradient between real steps (the
  gradient-accumulator package's ``GradientAccumulateOptimizer``, which needs Keras 2's legacy
  optimizers and does not run on Keras 3) moves Adam's and momentum SGD's weights on those steps.

bigbatch's ``AccumulatingModel`` counts optimizer steps for all of them.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import bigbatch.keras as bk

K, MICRO, ROWS = 4, 2, 24


def schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    return keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)


def regression(rows: int = ROWS) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 3))
    return x, x @ np.array([[1.0], [-2.0], [0.5]]) + 0.1 * rng.normal(size=(rows, 1))


def linear() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])


@pytest.mark.slow
def test_keras_schedule_runs_per_micro_step(float64) -> None:
    x, y = regression()
    model = linear()
    model.compile(keras.optimizers.SGD(schedule(), gradient_accumulation_steps=K), loss="mse")
    model.fit(x, y, batch_size=MICRO, shuffle=False, verbose=0)
    steps = ROWS // (MICRO * K)
    assert int(model.optimizer.iterations) == steps
    assert float(model.optimizer.learning_rate) == pytest.approx(0.1 * 0.5 ** (steps * K))
    ours = bk.AccumulatingModel(linear(), micro_batch=MICRO)
    ours.compile(keras.optimizers.SGD(schedule()), loss="mse")
    ours.fit(x, y, batch_size=MICRO * K, shuffle=False, verbose=0)
    assert int(ours.optimizer.iterations) == steps
    assert float(ours.optimizer.learning_rate) == pytest.approx(0.1 * 0.5 ** steps)


def ema(trajectory: list[list[np.ndarray]], momentum: float) -> list[np.ndarray]:
    """Keras's rule, once per entry: the first copies the weights, then a ← m·a + (1 − m)·w."""
    average = [w.copy() for w in trajectory[0]]
    for weights in trajectory[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
    return average


def fit_with_ema(model: keras.Model, optimizer: keras.Optimizer, batch: int,
                 inner: keras.Model) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    x, y = regression()
    seen: list[list[np.ndarray]] = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(inner.get_weights()))
    model.compile(optimizer, loss="mse")
    model.fit(x, y, batch_size=batch, shuffle=False, verbose=0, callbacks=[record])
    return seen, inner.get_weights()  # fit ends by copying the EMA into the weights


@pytest.mark.slow
def test_keras_ema_runs_per_micro_step(float64) -> None:
    model = linear()
    optimizer = keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5,
                                     gradient_accumulation_steps=K)
    micro_steps, final = fit_with_ema(model, optimizer, MICRO, model)
    steps = micro_steps[K - 1::K]  # the weights after each optimizer step
    per_micro = ema(micro_steps[K - 1:], 0.5)  # Keras's first K micro-steps copy the weights
    per_step = ema(steps, 0.5)
    assert max(np.abs(f - p).max() for f, p in zip(final, per_micro)) < 1e-12
    assert max(np.abs(f - p).max() for f, p in zip(final, per_step)) > 1e-3

    inner = linear()
    ours = bk.AccumulatingModel(inner, micro_batch=MICRO)
    optimizer = keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5)
    steps, final = fit_with_ema(ours, optimizer, MICRO * K, inner)
    assert max(np.abs(f - p).max() for f, p in zip(final, ema(steps, 0.5))) < 1e-12


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.Adam(0.1),
                                       lambda: keras.optimizers.SGD(0.1, momentum=0.9)])
def test_zero_gradient_steps_move_stateful_optimizers(float64, optimizer) -> None:
    """What an optimizer wrapper that passes zeros between real steps does to Adam and momentum."""
    w = keras.Variable(np.array([1.0, -1.0]))
    opt = optimizer()
    opt.apply([np.array([0.5, 0.25])], [w])
    after_real = w.numpy().copy()
    opt.apply([np.zeros(2)], [w])
    assert np.abs(w.numpy() - after_real).min() > 1e-3
