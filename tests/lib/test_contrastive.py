"""Gradient caching: the full-batch contrastive gradient with one micro-batch's activations."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import RTOL, max_rel_diff

from bigbatch import Accumulator, LossError
from bigbatch.contrastive import contrastive_step, info_nce

pytestmark = pytest.mark.usefixtures("float64")


class TwoTower(torch.nn.Module):
    """A shared token-bag encoder with dropout (so pass 2 must replay the RNG)."""

    def __init__(self, vocab: int = 50, dim: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(vocab, dim, mode="mean")
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.Tanh(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(32, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids))


def encode(model, batch):
    q, d = batch
    return model(q), model(d)


def pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 50, (n, 6), generator=g), torch.randint(0, 50, (n, 9), generator=g)


def split(batch, k: int):
    q, d = batch
    return list(zip(q.chunk(k), d.chunk(k)))


def full_batch_grads(model, batch, symmetric: bool, seed: int) -> list[torch.Tensor]:
    """The truth: one forward of the whole batch (one dropout draw per row, as pass 1 makes)."""
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    q, d = batch
    ls = info_nce(m(q), m(d), symmetric=symmetric)
    (ls.sum / ls.count).backward()
    return [p.grad.clone() for p in m.parameters()]


class _Capture(torch.optim.SGD):
    """SGD(lr=0) that records the gradients it is handed."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_gradient_equals_full_batch(k: int, symmetric: bool) -> None:
    model = TwoTower()
    batch = pairs(32, torch.Generator().manual_seed(1))
    model.eval()  # dropout off for the truth's single pass vs. K passes: same function
    truth = full_batch_grads(model, batch, symmetric, seed=3)
    opt = _Capture(model.parameters())
    acc = Accumulator(model, opt)
    stats = contrastive_step(acc, split(batch, k), encode,
                             lambda q, d: info_nce(q, d, symmetric=symmetric))
    assert max_rel_diff(opt.grads, truth) <= RTOL
    q, d = batch
    with torch.no_grad():
        expected = info_nce(model(q), model(d), symmetric=symmetric)
    assert stats.loss == pytest.approx(float(expected.sum) / expected.count, rel=RTOL)
    assert stats.count == expected.count


def test_dropout_masks_are_replayed_in_pass_two() -> None:
    """In training mode, the gradient is that of the loss at pass 1's dropout masks."""
    model = TwoTower()
    batch = pairs(16, torch.Generator().manual_seed(2))
    opt = _Capture(model.parameters())
    torch.manual_seed(5)
    contrastive_step(Accumulator(model, opt), split(batch, 4), encode, info_nce)
    # the truth: the same micro-batch forwards, in the same RNG order, with a graph
    m = copy.deepcopy(model)
    torch.manual_seed(5)
    embs = [encode(m, mb) for mb in split(batch, 4)]
    ls = info_nce(torch.cat([e[0] for e in embs]), torch.cat([e[1] for e in embs]))
    (ls.sum / ls.count).backward()
    assert max_rel_diff(opt.grads, [p.grad for p in m.parameters()]) <= RTOL


def test_naive_per_micro_batch_negatives_differ() -> None:
    model = TwoTower().eval()
    batch = pairs(32, torch.Generator().manual_seed(1))
    truth = full_batch_grads(model, batch, False, seed=3)
    opt = _Capture(model.parameters())
    Accumulator(model, opt).step(split(batch, 4), lambda m, mb: info_nce(*encode(m, mb)))
    assert max_rel_diff(opt.grads, truth) > 1e-3


def test_bad_inputs() -> None:
    with pytest.raises(LossError, match="same shape"):
        info_nce(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(LossError, match="temperature"):
        info_nce(torch.zeros(3, 4), torch.zeros(3, 4), temperature=0)
    model = TwoTower()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(LossError, match="tuple of tensors"):
        contrastive_step(acc, split(pairs(4, torch.Generator()), 2), lambda m, b: "x", info_nce)
