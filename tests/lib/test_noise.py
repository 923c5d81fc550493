"""The gradient noise scale against closed forms, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from reference import mlp

from bigbatch import Accumulator, LossSum
from bigbatch.noise import NoiseEstimate, NoiseScaleEMA, estimate_noise

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [3, 40, 7, 22, 9]])
def test_estimator_is_unbiased(sizes: list[int]) -> None:
    """The estimators are linear in the squared norms: fed their expectations
    E|g_B|² = |G|² + tr(Σ)/B, they return |G|² and tr(Σ) exactly."""
    g2, trace = 0.37, 5.9
    n = sum(sizes)
    small = sum(g2 + trace / b for b in sizes) / len(sizes)
    inv = sum(1 / b for b in sizes) / len(sizes)
    est = estimate_noise(small, inv, g2 + trace / n, n)
    assert est is not None
    assert est.grad_sq == pytest.approx(g2, rel=1e-10)
    assert est.trace == pytest.approx(trace, rel=1e-10)
    assert est.b_simple == pytest.approx(trace / g2, rel=1e-10)
    # the negative case: the library's estimate with the S/N correction taken out (|G|² read as
    # the big batch's |g_N|², which still carries tr(Σ)/N of noise) misses tr(Σ)/|G|²
    biased = biased_estimate(est)
    assert biased.grad_sq == pytest.approx(g2 + trace / n, rel=1e-10)
    assert abs(biased.b_simple - trace / g2) / (trace / g2) > 1e-3


def biased_estimate(est: NoiseEstimate) -> NoiseEstimate:
    """``est`` without the S/N correction: ``|G|²`` taken as ``|g_N|²`` itself."""
    return NoiseEstimate(grad_sq=est.grad_sq + est.trace / est.big_batch, trace=est.trace,
                         small_batch=est.small_batch, big_batch=est.big_batch)


def test_one_micro_batch_has_no_estimate() -> None:
    assert estimate_noise(1.0, 1 / 32, 1.0, 32) is None


def regression(d: int, sigma: float, n: int, g: torch.Generator):
    x = torch.randn(n, d, generator=g)
    w_star = torch.ones(d)
    return x, x @ w_star + sigma * torch.randn(n, generator=g)


def sq_loss(model, batch) -> LossSum:
    x, y = batch
    return LossSum(0.5 * ((model(x).squeeze(-1) - y) ** 2).sum(), y.numel())


def analytic_b_simple(d: int, sigma: float, delta: torch.Tensor) -> float:
    """x ~ N(0, I_d), y = x·w* + σξ, loss ½(x·w − y)², δ = w − w*: per-item gradient
    g = x(xᵀδ) − σξx, so G = δ, E|g|² = (d+2)|δ|² + σ²d and tr Σ = (d+1)|δ|² + σ²d."""
    dd = float(delta @ delta)
    return ((d + 1) * dd + sigma**2 * d) / dd


@pytest.mark.parametrize("sigma", [0.5, 3.0])
def test_noise_scale_matches_closed_form_on_linear_regression(sigma: float) -> None:
    """The smoothed B_simple lands within 3 of its own standard errors of the closed form, and
    the estimator without the S/N correction (biased by tr(Σ)/N in |G|², 7% here at σ=0.5 and
    26% at σ=3) lands outside.

    The tolerance is the estimator's own spread, measured from the same run: at lr=0 the steps
    are independent draws, the EMA is a weighted mean with weights w_t, and to first order the
    ratio's relative error is Σ_t w_t z_t with z_t = tr_t/T − g_t/G (T, G the smoothed values), so
    its standard error is std(z)·√Σw_t² (≈1.2% at σ=0.5, ≈2.4% at σ=3)."""
    d, k, micro, steps, beta = 8, 8, 16, 600, 0.995
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.full((1, d), 1.5))  # δ = 0.5 in every coordinate
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a fixed point: the truth is constant
    acc = Accumulator(model, opt, noise_scale=True)
    ema, naive = NoiseScaleEMA(beta=beta), NoiseScaleEMA(beta=beta)
    traces, grad_sqs = [], []
    for _ in range(steps):
        cycle = [regression(d, sigma, micro, g) for _ in range(k)]
        stats = acc.step(cycle, sq_loss)
        assert stats.noise is not None and stats.noise.big_batch == k * micro
        ema.update(stats.noise)
        naive.update(biased_estimate(stats.noise))
        traces.append(stats.noise.trace)
        grad_sqs.append(stats.noise.grad_sq)
    truth = analytic_b_simple(d, sigma, model.weight.detach()[0] - 1.0)
    w = beta ** torch.arange(steps - 1, -1, -1.0)
    w = w / w.sum()
    tr, gs = torch.tensor(traces), torch.tensor(grad_sqs)
    assert float(w @ tr) / float(w @ gs) == pytest.approx(ema.value, rel=1e-10)  # these weights
    z = tr / float(w @ tr) - gs / float(w @ gs)
    tol = 3 * math.sqrt(z.var().item() * (w**2).sum().item())
    assert 0.005 < tol < 0.1  # the spread is a real, measured one (not zero, not huge)
    assert abs(ema.value - truth) / truth < tol
    print(f"σ={sigma}: error {abs(ema.value - truth) / truth:.4f}, tolerance {tol:.4f}, "
          f"without the S/N correction {abs(naive.value - truth) / truth:.4f}")
    assert abs(naive.value - truth) / truth > tol  # the negative case
    assert (truth > 40) == (sigma > 1)  # the two settings really differ


def test_hooks_do_not_change_training() -> None:
    torch.manual_seed(0)
    a = mlp()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    cycles = [[(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g))
               for _ in range(4)] for _ in range(3)]

    def loss(m, batch):
        x, y = batch
        return LossSum(((m(x) - y) ** 2).sum(), y.numel())

    acc_a = Accumulator(a, torch.optim.SGD(a.parameters(), lr=0.1), noise_scale=True)
    acc_b = Accumulator(b, torch.optim.SGD(b.parameters(), lr=0.1))
    for c in cycles:
        sa, sb = acc_a.step(c, loss), acc_b.step(c, loss)
        assert sa.noise is not None and sb.noise is None
        assert math.isfinite(sa.noise.trace)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
