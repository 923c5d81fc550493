"""Mixed precision: fp16 loss scaling and skipping, bf16 with float32 accumulation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import lm_batch, max_rel_diff, mlp

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


def test_fp16_step_matches_fp32_closely() -> None:
    torch.manual_seed(0)
    model = mlp()
    c = cycle(k=4, rows=8)
    ref, m16 = copy.deepcopy(model), copy.deepcopy(model)
    Accumulator(ref, torch.optim.SGD(ref.parameters(), lr=0.1)).step(c, mse_sum)
    st = Accumulator(m16, torch.optim.SGD(m16.parameters(), lr=0.1), precision="fp16").step(
        c, mse_sum
    )
    assert not st.skipped and st.loss_scale is not None
    upd = [a - b for a, b in zip(m16.parameters(), model.parameters())]
    want = [a - b for a, b in zip(ref.parameters(), model.parameters())]
    assert max_rel_diff(upd, want) < 2e-2  # fp16 forward: agreement at half-precision level


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


def test_bf16_lm_step_is_finite() -> None:
    from reference import TinyLM

    torch.manual_seed(0)
    model = TinyLM()
    acc = Accumulator(model, torch.optim.AdamW(model.parameters(), lr=1e-3), precision="bf16")
    stats = acc.step([lm_batch(4) for _ in range(3)],
                     lambda m, b: token_cross_entropy(m(b["input_ids"]), b["labels"]))
    assert not stats.skipped and math.isfinite(stats.grad_norm)
