"""Mixed precision: fp16 loss scaling and skipping, bf16 with float32 accumulation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import full_batch_train, lm_batch, lm_mean_loss, max_rel_diff, mlp

from bigbatch import Accumulator, BigBatchError, LossSum, token_cross_entropy


def mse_sum(m, batch) -> LossSum:
    x, y = batch
    return LossSum(F.mse_loss(m(x).float(), y, reduction="sum"), y.numel())


def cycle(k: int = 4, rows: int = 4, gen: int = 0):
    g = torch.Generator().manual_seed(gen)
    return [(torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g))
            for _ in range(k)]


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def test_fp16_overflow_skips_step_and_scheduler() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    acc = Accumulator(model, opt, scheduler=sched, precision="fp16")
    before = copy.deepcopy(model)
    c = cycle()

    def injected(m, batch):  # finite loss, infinite gradient in the third micro-batch
        x, y = batch
        out = m(x)
        if batch is c[2]:
            out = _InfGrad.apply(out)
        return LossSum(F.mse_loss(out.float(), y, reduction="sum"), y.numel())

    scale0 = acc.precision.loss_scale
    stats = acc.step(c, injected)
    assert stats.skipped and stats.skip_reason == "fp16 overflow"
    assert stats.loss_scale == scale0 and acc.precision.loss_scale == scale0 / 2
    assert max_rel_diff(model, before) == 0.0
    assert opt.state == {} and sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 1e-2
    ok = acc.step(cycle(gen=1), mse_sum)  # the next clean cycle steps
    assert not ok.skipped and sched.last_epoch == 1 and max_rel_diff(model, before) > 0


def updates_against_float64(model: torch.nn.Module, trained: torch.nn.Module,
                            c: list, mean_loss, lr: float) -> tuple[float, float]:
    """Relative distance (‖Δ − Δ*‖ / ‖Δ*‖ over all parameters) of ``trained``'s one-step update
    from the float64 full-batch update Δ* (plain PyTorch, tests/support/reference.py), and the
    naive mean-of-micro-batch-means update's."""
    base = copy.deepcopy(model).double()
    c64 = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()}
           if isinstance(b, dict) else tuple(t.double() for t in b) for b in c]
    ref = full_batch_train(base, lambda m: torch.optim.SGD(m.parameters(), lr=lr), [c64],
                           mean_loss)
    naive = copy.deepcopy(base)  # each micro-batch's mean, over K: blind to the counts
    for b in c64:
        (mean_loss(naive, b) / len(c64)).backward()
    torch.optim.SGD(naive.parameters(), lr=lr).step()
    def update(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([(a.double() - b).detach().flatten()
                          for a, b in zip(m.parameters(), base.parameters())])

    want = update(ref)
    return (float((update(trained) - want).norm() / want.norm()),
            float((update(naive) - want).norm() / want.norm()))


def mse_mean(m, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(m(x), y)


def test_fp16_step_matches_the_full_batch_with_unequal_micro_batches() -> None:
    """fp16 agrees with the float64 full batch at half-precision level (5e-3); the micro-batches
    hold 19, 1, 9 and 3 rows, so the mean of micro-batch means is far outside that tolerance
    (the big one first: the first cycle's loss scale is estimated from it and does not overflow)."""
    torch.manual_seed(0)
    model = mlp()
    g = torch.Generator().manual_seed(0)
    c = [(torch.randn(r, 6, generator=g), torch.randn(r, 3, generator=g)) for r in (19, 1, 9, 3)]
    m16 = copy.deepcopy(model)
    st = Accumulator(m16, torch.optim.SGD(m16.parameters(), lr=0.1), precision="fp16").step(
        c, mse_sum
    )
    assert not st.skipped and st.loss_scale is not None
    err, naive = updates_against_float64(model, m16, c, mse_mean, lr=0.1)
    assert err < 5e-3, err  # fp16 forward (11 bits of mantissa): 4e-4 here
    assert naive > 100 * 5e-3, naive  # the negative case fails the same tolerance by far


def test_fp16_refuses_half_parameters() -> None:
    model = mlp().half()
    with pytest.raises(BigBatchError, match="precision='fp16' needs float32 parameters"):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")


def test_unknown_precision() -> None:
    model = mlp()
    with pytest.raises(BigBatchError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1),
                    precision="fp8")  # type: ignore[arg-type]


def test_bf16_runs_under_autocast_with_fp32_gradients() -> None:
    torch.manual_seed(0)
    model = mlp()
    acc = Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="bf16")
    seen: list[torch.dtype] = []

    def loss_fn(m, batch):
        x, y = batch
        out = m(x)
        seen.append(out.dtype)
        return LossSum(F.mse_loss(out.float(), y, reduction="sum"), y.numel())

    c = cycle()
    for b in c[:2]:
        acc.accumulate(b, loss_fn)
    assert seen == [torch.bfloat16, torch.bfloat16]  # the forward ran in bf16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    stats = acc.finish()
    assert not stats.skipped and math.isfinite(stats.loss)


def test_bf16_parameters_accumulate_in_fp32_buffers() -> None:
    """bf16 weights: the K-term gradient sum is kept in float32 and rounded once."""
    torch.manual_seed(0)
    k = 64
    base = mlp()
    c = cycle(k=k, rows=2)

    def loss_fn(m, batch):
        x, y = batch
        return LossSum(F.mse_loss(m(x.to(torch.bfloat16)).float(), y, reduction="sum"),
                       y.numel())

    # float64 truth of the accumulated gradient, from the same bf16-rounded weights
    ref = copy.deepcopy(base).to(torch.bfloat16).double()
    x = torch.cat([b[0] for b in c]).to(torch.bfloat16).double()
    y = torch.cat([b[1] for b in c]).double()
    F.mse_loss(ref(x), y).backward()
    truth = [p.grad for p in ref.parameters()]

    m = copy.deepcopy(base).to(torch.bfloat16)
    acc = Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.1), precision="bf16")
    for b in c:
        acc.accumulate(b, loss_fn)
    assert all(p.grad is None for p in m.parameters())  # low-precision grads moved out
    bufs = acc.precision.grads(list(m.parameters()))
    assert len(bufs) == 4 and all(b.dtype == torch.float32 for b in bufs)
    n = sum(b[1].numel() for b in c)
    pre = acc._prescale  # backward ran on c · sum (see bigbatch.engine); undo it to compare
    ours = [b.double() / (pre * n) for b in bufs]

    # what plain bf16 .grad accumulation would give on the same micro-batches
    naive = copy.deepcopy(base).to(torch.bfloat16)
    for b in c:
        loss_fn(naive, b).sum.backward()
    theirs = [p.grad.double() / n for p in naive.parameters()]

    err_ours, err_naive = max_rel_diff(ours, truth), max_rel_diff(theirs, truth)
    assert err_ours < err_naive / 4, (err_ours, err_naive)
    stats = acc.finish()
    assert not stats.skipped and all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert all(p.grad is None for p in m.parameters())


def test_bf16_lm_step_matches_the_full_batch_with_unequal_token_counts() -> None:
    """A bf16 step of a small transformer agrees with the float64 full batch at bf16 level; the
    micro-batches hold 3, 24 and 48 real tokens, so the mean of micro-batch means does not."""
    from reference import TinyLM

    torch.manual_seed(0)
    model = TinyLM()
    g = torch.Generator().manual_seed(0)
    c = [lm_batch(4, lengths=lengths, generator=g)
         for lengths in ([1, 1, 1, 0], [6, 6, 6, 6], [12, 12, 12, 12])]
    m = copy.deepcopy(model)
    acc = Accumulator(m, torch.optim.SGD(m.parameters(), lr=0.5), precision="bf16")
    stats = acc.step(c, lambda m, b: token_cross_entropy(m(b["input_ids"]), b["labels"]))
    assert not stats.skipped and math.isfinite(stats.grad_norm)
    err, naive = updates_against_float64(model, m, c, lm_mean_loss, lr=0.5)
    assert err < 5e-2, err  # bf16 forward (8 bits of mantissa): 1.2e-2 here
    assert naive > 20 * 5e-2, naive  # the negative case fails the same tolerance by far
