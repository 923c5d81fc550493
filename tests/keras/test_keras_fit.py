"""``AccumulatingModel.fit`` against one big batch, written by hand (``keras_reference``), float64.

Padded token rows of very uneven lengths (six rows hold one token), the padding masked by
``Embedding(mask_zero=True)``, an L2 regularizer, Adam with an exponentially decaying learning
rate, gradient clipping, and 22 rows at batch 8: every epoch ends with a short batch of 6.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras_reference import distance, full_batch_fit, padded_tokens, token_model

import bigbatch.keras as bk
from bigbatch.errors import BatchPlanError, BigBatchError, LossError

RATE = 0.05


def schedule() -> keras.optimizers.schedules.LearningRateSchedule:
    return keras.optimizers.schedules.ExponentialDecay(RATE, decay_steps=1, decay_rate=0.7)


def sce(**kw) -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, **kw)


def train(split: dict, x, y, w=None, *, clip: dict, epochs: int = 2, loss=None,
          batch: int = 8) -> tuple[keras.Model, bk.AccumulatingModel, keras.callbacks.History]:
    inner = token_model()
    model = bk.AccumulatingModel(inner, **split)
    model.compile(keras.optimizers.Adam(schedule(), **clip), loss=loss or sce())
    history = model.fit(x, y, sample_weight=w, batch_size=batch, epochs=epochs, shuffle=False,
                        verbose=0)
    return inner, model, history


@pytest.mark.slow
@pytest.mark.parametrize("clip", [{"global_clipnorm": 0.25}, {"clipnorm": 0.1}])
@pytest.mark.parametrize("split", [{"micro_batch": 3}, {"accum_steps": 4}])
def test_fit_equals_one_big_batch(float64, clip: dict, split: dict) -> None:
    x, y, _ = padded_tokens(22)
    start = token_model().get_weights()
    reference = token_model()
    norms = full_batch_fit(reference, keras.optimizers.Adam(schedule(), **clip), x, y, batch=8,
                           epochs=2)
    assert max(norms) > 2 * max(clip.values())  # clipping changes the update
    inner, model, history = train(split, x, y, clip=clip)
    assert distance(inner.get_weights(), reference.get_weights(), start) < 1e-10
    assert int(model.optimizer.iterations) == 6  # 3 batches (8, 8, 6 rows) × 2 epochs


def test_weighted_tokens_equal_one_big_batch(float64) -> None:
    """Token weights with ``mean_with_sample_weight``: the mean over the weighted real tokens."""
    x, y, w = padded_tokens(22)
    start = token_model().get_weights()
    reference = token_model()
    full_batch_fit(reference, keras.optimizers.Adam(schedule(), global_clipnorm=0.5), x, y, w,
                   batch=8, weighted=True)
    inner, _, _ = train({"micro_batch": 3}, x, y, w, clip={"global_clipnorm": 0.5}, epochs=1,
                        loss=sce(reduction="mean_with_sample_weight"))
    assert distance(inner.get_weights(), reference.get_weights(), start) < 1e-10


@pytest.mark.slow
def test_schedule_callbacks_and_logs_count_optimizer_steps(float64) -> None:
    x, y, _ = padded_tokens(22)
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(
        (batch, int(model.optimizer.iterations), float(model.optimizer.learning_rate))))
    model = bk.AccumulatingModel(token_model(), micro_batch=3)
    model.compile(keras.optimizers.Adam(schedule()), loss=sce())
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                        callbacks=[record])
    assert [s[:2] for s in seen] == [(0, 1), (1, 2), (2, 3), (0, 4), (1, 5), (2, 6)]
    assert [s[2] for s in seen] == pytest.approx([RATE * 0.7 ** k for k in range(1, 7)])
    # The epoch's loss is Keras's: the full batches' losses, weighted by their rows.
    plain = token_model()
    plain.compile(keras.optimizers.Adam(schedule()), loss=sce())
    expected = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert history.history["loss"] == pytest.approx(expected.history["loss"], rel=1e-10)


def test_a_step_with_no_items_is_skipped(float64) -> None:
    x, y, _ = padded_tokens(8)
    x[:] = 0  # every token is padding: nothing to average
    inner = token_model()
    before = inner.get_weights()
    model = bk.AccumulatingModel(inner, micro_batch=3)
    model.compile(keras.optimizers.Adam(schedule()), loss=sce())
    model.fit(x, y, batch_size=8, verbose=0)
    assert int(model.optimizer.iterations) == 0
    assert all(np.array_equal(a, b) for a, b in zip(inner.get_weights(), before))


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({}, BatchPlanError, "one of micro_batch"),
    ({"micro_batch": 2, "accum_steps": 2}, BatchPlanError, "one of micro_batch"),
    ({"micro_batch": 0}, BatchPlanError, "micro_batch=0 must be a positive integer"),
    ({"accum_steps": 2.5}, BatchPlanError, "accum_steps=2.5"),
    ({"micro_batch": 2, "batchnorm": "freeze"}, BigBatchError, "batchnorm='freeze'"),
])
def test_bad_arguments_say_what_to_do(kwargs: dict, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        bk.AccumulatingModel(token_model(), **kwargs)


@pytest.mark.parametrize(("loss", "words"), [
    (sce(reduction="sum"), "reduction 'sum' is not a mean"),
    (["mse", "mae"], "accumulates one loss; compile was given 2"),
    ("crossentropy", "name it"),
    (None, "without a loss"),
])
def test_losses_without_a_count_are_refused_at_compile(loss, words: str) -> None:
    model = bk.AccumulatingModel(token_model(), micro_batch=2)
    with pytest.raises(LossError, match=words):
        model.compile("adam", loss=loss)


def test_wrapping_something_else_is_refused() -> None:
    with pytest.raises(BigBatchError, match="wraps a keras.Model, got Dense"):
        bk.AccumulatingModel(keras.layers.Dense(2), micro_batch=2)


def test_saved_wrapper_loads_compiled(float64, tmp_path) -> None:
    x, y, _ = padded_tokens(8)
    model = bk.AccumulatingModel(token_model(), micro_batch=3)
    model.compile(keras.optimizers.Adam(schedule()), loss=sce())
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, bk.AccumulatingModel) and loaded.micro_batch == 3
    assert loaded.compiled
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
