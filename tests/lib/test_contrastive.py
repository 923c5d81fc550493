"""Gradient caching: the full-batch contrastive gradient with one micro-batch's activations."""

from __future__ import annotations

import copy
import math

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


def reference_info_nce(q: torch.Tensor, d: torch.Tensor, *, temperature: float = 0.05,
                       symmetric: bool = False, normalize: bool = True) -> torch.Tensor:
    """InfoNCE written from its formula, independently of bigbatch (no F.normalize, no
    cross_entropy): s_ij = q_i·d_j / (|q_i||d_j| τ) (dot products / τ without normalize),
    ℓ_i = log Σ_j exp(s_ij) − s_ii, the mean over rows (and over columns too when symmetric)."""
    if normalize:
        q = q / q.pow(2).sum(1, keepdim=True).sqrt()
        d = d / d.pow(2).sum(1, keepdim=True).sqrt()
    s = (q.unsqueeze(1) * d.unsqueeze(0)).sum(-1) / temperature  # s[i, j]
    rows = torch.logsumexp(s, dim=1) - s.diagonal()
    if not symmetric:
        return rows.mean()
    cols = torch.logsumexp(s, dim=0) - s.diagonal()
    return (rows.sum() + cols.sum()) / (2 * len(q))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_info_nce_matches_its_formula(symmetric: bool, normalize: bool,
                                      temperature: float) -> None:
    g = torch.Generator().manual_seed(5)
    q0, d0 = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    q, d = q0.clone().requires_grad_(), d0.clone().requires_grad_()
    ls = info_nce(q, d, temperature=temperature, symmetric=symmetric, normalize=normalize)
    assert int(ls.count) == 7 * (2 if symmetric else 1)
    (ls.sum / ls.count).backward()
    qr, dr = q0.clone().requires_grad_(), d0.clone().requires_grad_()
    want = reference_info_nce(qr, dr, temperature=temperature, symmetric=symmetric,
                              normalize=normalize)
    want.backward()
    assert float(ls.sum / ls.count) == pytest.approx(float(want), rel=RTOL)
    assert max_rel_diff([q.grad, d.grad], [qr.grad, dr.grad]) <= RTOL
    # the settings matter: a different temperature, or the other side, gives another loss
    other = reference_info_nce(q0, d0, temperature=2 * temperature, symmetric=symmetric,
                               normalize=normalize)
    assert abs(float(other) - float(want)) > 1e-3
    assert abs(float(reference_info_nce(q0, d0, temperature=temperature,
                                        symmetric=not symmetric, normalize=normalize))
               - float(want)) > 1e-3


def test_info_nce_closed_form() -> None:
    """Orthonormal queries and docs = queries: s_ii = 1/τ, s_ij = 0, so each row's loss is
    log(e^{1/τ} + (n − 1)) − 1/τ."""
    n, tau = 4, 0.5
    q = torch.eye(n)
    ls = info_nce(q, q.clone(), temperature=tau)
    assert float(ls.sum) == pytest.approx(n * (math.log(math.exp(1 / tau) + n - 1) - 1 / tau),
                                          rel=RTOL)


def full_batch_grads(model, batch, symmetric: bool, seed: int) -> list[torch.Tensor]:
    """The truth: one forward of the whole batch (one dropout draw per row, as pass 1 makes),
    with the loss written from its formula (:func:`reference_info_nce`), not bigbatch's."""
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    q, d = batch
    reference_info_nce(m(q), m(d), symmetric=symmetric).backward()
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
