"""LossSum, token_cross_entropy, and the engine's checks of what a loss function returns."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import mlp

from bigbatch import (
    Accumulator,
    BatchNormWarning,
    BigBatchError,
    LossError,
    LossSum,
    token_cross_entropy,
)


def test_token_cross_entropy_is_sum_and_count() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 2:] = -100
    labels[2, :] = -100
    ls = token_cross_entropy(logits, labels)
    keep = labels != -100
    logp = torch.log_softmax(logits, -1)
    want = -sum(logp[i, j, labels[i, j]] for i, j in keep.nonzero().tolist())
    assert int(ls.count) == int(keep.sum()) == 7
    assert math.isclose(ls.sum.item(), want.item(), rel_tol=1e-12)
    assert ls.count.dtype == torch.int64


def test_token_cross_entropy_custom_ignore_index_and_all_ignored() -> None:
    logits = torch.randn(2, 4, 3, requires_grad=True)
    labels = torch.full((2, 4), 0)
    ls = token_cross_entropy(logits, labels, ignore_index=0)
    assert int(ls.count) == 0 and ls.sum.item() == 0.0  # no NaN for an empty micro-batch
    ls.sum.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_token_cross_entropy_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"logits shape \(2, 4, 3\) does not match labels shape "
                       r"\(2, 5\)"):
        token_cross_entropy(torch.randn(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))


def test_token_cross_entropy_names_the_logits_of_a_model_output() -> None:
    """A Hugging Face ModelOutput (what ``model(...)`` returns) instead of its ``.logits``."""
    outputs = pytest.importorskip("transformers.modeling_outputs")
    logits, labels = torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long)
    out = outputs.CausalLMOutputWithPast(logits=logits)
    with pytest.raises(LossError, match=r"got CausalLMOutputWithPast; pass outputs\.logits$"):
        token_cross_entropy(out, labels)
    with pytest.raises(LossError, match="takes labels as an integer tensor"):
        token_cross_entropy(logits, labels.tolist())
    assert token_cross_entropy(out.logits, labels).sum.item() > 0


def test_from_mean() -> None:
    pred, y = torch.randn(4, 3), torch.randn(4, 3)
    ls = LossSum.from_mean(F.mse_loss(pred, y), y.numel())
    assert math.isclose(ls.sum.item(), F.mse_loss(pred, y, reduction="sum").item(), rel_tol=1e-6)
    empty = LossSum.from_mean(F.mse_loss(pred[:0], y[:0]), 0)  # the mean of nothing is NaN
    assert empty.sum.item() == 0.0 and empty.count == 0
    t = LossSum.from_mean(torch.tensor(2.0), torch.tensor(3))
    assert t.sum.item() == 6.0


def _acc(model=None) -> Accumulator:
    model = model or mlp()
    return Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))


BATCH = (torch.randn(2, 6), torch.randn(2, 3))


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda out: out.sum(), "got Tensor .*LossSum.from_mean"),
        (lambda out: (out.sum(), 3), "got tuple"),
        (lambda out: LossSum(out, 3), r"must be a scalar tensor, got shape \(2, 3\)"),
        (lambda out: LossSum(1.5, 3), "must be a scalar tensor, got float"),
        (lambda out: LossSum(out.sum(), -1), "non-negative int, got -1"),
        (lambda out: LossSum(out.sum(), 2.0), "non-negative int, got 2.0"),
        (lambda out: LossSum(out.sum(), torch.tensor(2.0)), "integer scalar tensor"),
        (lambda out: LossSum(out.sum().detach(), 2), "carries no gradient"),
    ],
)
def test_bad_loss_returns_are_named(returned, message) -> None:
    acc = _acc()
    with pytest.raises(LossError, match=message):
        acc.step([BATCH], lambda m, b: returned(m(b[0])))
    assert acc.micro_step == 0  # the failed cycle was discarded


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_grad_norm": 0}, "clip_grad_norm must be a positive finite number"),
        ({"clip_grad_norm": math.inf}, "clip_grad_norm must be a positive finite number"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be 'skip' or 'stop'"),
    ],
)
def test_accumulator_argument_errors(kwargs, message) -> None:
    model = mlp()
    with pytest.raises(BigBatchError, match=message):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_accumulator_type_errors() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(BigBatchError, match="model must be a torch.nn.Module"):
        Accumulator(lambda x: x, opt)  # type: ignore[arg-type]
    with pytest.raises(BigBatchError, match="optimizer must be a torch.optim.Optimizer"):
        Accumulator(model, object())  # type: ignore[arg-type]
    with pytest.raises(BigBatchError, match="model has no parameters"):
        Accumulator(torch.nn.ReLU(), opt)


def test_batchnorm_warning_names_the_layers() -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.LazyLinear(2), torch.nn.BatchNorm1d(2),
    )
    model(torch.randn(2, 1, 5, 5))
    with pytest.warns(BatchNormWarning, match=r"BatchNorm layers \(1, 4\).*one micro-batch"):
        _acc(model)


def test_no_batchnorm_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _acc(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3)))
