"""The Accumulator against independent full-batch training, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from reference import (
    RTOL,
    TinyLM,
    full_batch_train,
    lm_batch,
    lm_mean_loss,
    max_rel_diff,
    mlp,
)

import bigbatch
from bigbatch import Accumulator, BatchPlan, LossSum, token_cross_entropy

pytestmark = pytest.mark.usefixtures("float64")


def lm_loss(model, batch) -> LossSum:
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def mlp_loss(model, batch) -> LossSum:
    x, y = batch
    return LossSum(F.mse_loss(model(x), y, reduction="sum"), y.numel())


def mlp_mean(model, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}


def train_engine(model, make_opt, cycles, loss_fn, **kwargs):
    model = copy.deepcopy(model)
    acc = Accumulator(model, make_opt(model), **kwargs)
    stats = [acc.step(cycle, loss_fn) for cycle in cycles]
    return model, stats


def make_cycles(kind: str, k: int, steps: int = 3, global_batch: int = 16):
    plan = BatchPlan(global_batch=global_batch, accum_steps=k, world_size=1)
    out = []
    for _ in range(steps):
        if kind == "mlp":
            big = (torch.randn(global_batch, 6), torch.randn(global_batch, 3))
        else:
            big = lm_batch(global_batch)
        out.append(plan.split(big))
    return out


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_matches_full_batch(kind: str, opt: str, k: int) -> None:
    model = mlp() if kind == "mlp" else TinyLM()
    cycles = make_cycles(kind, k)
    loss_fn, mean_fn = (mlp_loss, mlp_mean) if kind == "mlp" else (lm_loss, lm_mean_loss)
    truth = full_batch_train(model, OPTIMIZERS[opt], cycles, mean_fn)
    got, stats = train_engine(model, OPTIMIZERS[opt], cycles, loss_fn)
    assert max_rel_diff(got, truth) <= RTOL
    assert max_rel_diff(got, model) > 1e-3  # training moved the weights: the check has teeth
    assert [s.micro_batches for s in stats] == [k, k, k]
    assert [s.step for s in stats] == [1, 2, 3]


def test_from_mean_adapter_matches_full_batch() -> None:
    model = mlp()
    cycles = make_cycles("mlp", 4)

    def loss_fn(m, batch):
        x, y = batch
        return LossSum.from_mean(F.mse_loss(m(x), y), y.numel())

    truth = full_batch_train(model, OPTIMIZERS["adamw"], cycles, mlp_mean)
    got, _ = train_engine(model, OPTIMIZERS["adamw"], cycles, loss_fn)
    assert max_rel_diff(got, truth) <= RTOL


def uneven_cycle():
    """Four micro-batches of 4 rows: one with a single real token, one full, two mixed."""
    lengths = [[1, 0, 0, 0], [12, 12, 12, 12], [3, 7, 0, 12], [5, 5, 2, 9]]
    return [lm_batch(4, lengths=lens) for lens in lengths]


def one_step_update(model, cycle, run):
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    run(model, cycle)
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_uneven_padding_exact_and_naive_differs() -> None:
    model = TinyLM()
    cycle = uneven_cycle()
    sgd = OPTIMIZERS["sgd"]

    def truth(m, c):
        full_batch_train(m, sgd, [c], lm_mean_loss)  # (copy inside; redo in place below)
        opt = sgd(m)
        lm_mean_loss(m, {k: torch.cat([b[k] for b in c]) for k in c[0]}).backward()
        opt.step()

    def engine(m, c):
        Accumulator(m, sgd(m)).step(c, lm_loss)

    def naive(m, c):  # the pre-2024 recipe: mean over each micro-batch's own tokens, / K
        opt = sgd(m)
        for b in c:
            (lm_mean_loss(m, b) / len(c)).backward()
        opt.step()

    want = one_step_update(model, cycle, truth)
    assert max_rel_diff(one_step_update(model, cycle, engine), want) <= RTOL
    assert max_rel_diff(one_step_update(model, cycle, naive), want) > 1e-3


def test_stats_loss_is_exact_token_mean() -> None:
    model = TinyLM()
    cycle = uneven_cycle()
    full = {k: torch.cat([b[k] for b in cycle]) for k in cycle[0]}
    with torch.no_grad():
        want = lm_mean_loss(model, full).item()
    stats = Accumulator(model, OPTIMIZERS["sgd"](model)).step(cycle, lm_loss)
    assert math.isclose(stats.loss, want, rel_tol=RTOL)
    assert stats.count == int((full["labels"] != -100).sum())


def test_tail_cycle_is_normalized_by_what_it_holds() -> None:
    model = TinyLM()
    plan = BatchPlan(micro_batch=4, accum_steps=4, world_size=1)
    micro = [lm_batch(4) for _ in range(4 + 3)]  # one full cycle, then a tail of 3
    cycles = list(plan.cycles(micro))
    assert [len(c) for c in cycles] == [4, 3]
    truth = full_batch_train(model, OPTIMIZERS["adamw"], cycles, lm_mean_loss)
    got, stats = train_engine(model, OPTIMIZERS["adamw"], cycles, lm_loss)
    assert max_rel_diff(got, truth) <= RTOL
    assert stats[-1].micro_batches == 3
    # the negative case: the tail divided by the nominal K (Lightning #19987), i.e. its mean
    # scaled by 3/4, is under-weighted and ends elsewhere
    def nominal_k(m, batch):
        return lm_mean_loss(m, batch) * batch["labels"].shape[0] / (4 * 4)

    nominal = full_batch_train(model, OPTIMIZERS["adamw"], cycles, nominal_k)
    assert max_rel_diff(nominal, truth) > 1e-3
    drop = BatchPlan(micro_batch=4, accum_steps=4, world_size=1, tail="drop")
    assert [len(c) for c in drop.cycles(micro)] == [4]


def test_clip_after_accumulation_equals_full_batch_clip() -> None:
    model = mlp()
    cycles = make_cycles("mlp", 4)
    clip = 0.05
    truth = full_batch_train(model, OPTIMIZERS["sgd"], cycles, mlp_mean, clip=clip)
    got, stats = train_engine(model, OPTIMIZERS["sgd"], cycles, mlp_loss, clip_grad_norm=clip)
    assert all(s.grad_norm > clip for s in stats)  # clipping was active
    assert max_rel_diff(got, truth) <= RTOL

    def clip_each_micro_batch(m, cycle):  # the wrong way: clip every micro-batch's gradient
        opt = OPTIMIZERS["sgd"](m)
        total = [torch.zeros_like(p) for p in m.parameters()]
        for b in cycle:
            m.zero_grad()
            (mlp_mean(m, b) / len(cycle)).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            for t, p in zip(total, m.parameters()):
                t += p.grad
        for t, p in zip(total, m.parameters()):
            p.grad = t
        opt.step()

    def clip_once(m, cycle):
        Accumulator(m, OPTIMIZERS["sgd"](m), clip_grad_norm=clip).step(cycle, mlp_loss)

    want = one_step_update(model, cycles[0], clip_once)
    assert max_rel_diff(one_step_update(model, cycles[0], clip_each_micro_batch), want) > 1e-3


def test_grad_norm_is_full_batch_norm() -> None:
    model = mlp()
    cycle = make_cycles("mlp", 4, steps=1)[0]
    ref = copy.deepcopy(model)
    mlp_mean(ref, (torch.cat([b[0] for b in cycle]), torch.cat([b[1] for b in cycle]))).backward()
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), math.inf).item()
    stats = Accumulator(model, OPTIMIZERS["sgd"](model)).step(cycle, mlp_loss)
    assert math.isclose(stats.grad_norm, want, rel_tol=RTOL)


def test_scheduler_steps_once_per_optimizer_step() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    calls: list[int] = []

    def lam(step: int) -> float:
        calls.append(step)
        return 0.5**step

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    acc = Accumulator(model, opt, scheduler=sched)
    lrs = [acc.step(c, mlp_loss).lr for c in make_cycles("mlp", 8, steps=5)]
    assert sched.last_epoch == 5
    assert lrs == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert calls == [0, 1, 2, 3, 4, 5]  # the constructor's call, then one per step


def test_zero_item_cycle_is_skipped_without_nan() -> None:
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    acc = Accumulator(model, opt, scheduler=sched)
    before = copy.deepcopy(model)
    empty = [lm_batch(4, lengths=[0, 0, 0, 0]) for _ in range(3)]
    stats = acc.step(empty, lm_loss)
    assert stats.skipped and stats.skip_reason == "no items" and stats.count == 0
    assert max_rel_diff(model, before) == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state == {} and sched.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())
    # the engine is still usable afterwards, and counts the skip
    ok = acc.step([lm_batch(4)], lm_loss)
    assert not ok.skipped and ok.step == 2 and acc.steps_skipped == 1 and acc.steps_taken == 1


def test_empty_cycle_list_is_skipped() -> None:
    model = mlp()
    stats = Accumulator(model, OPTIMIZERS["sgd"](model)).step([], mlp_loss)
    assert stats.skipped and stats.skip_reason == "no items" and stats.micro_batches == 0


@pytest.mark.parametrize("whole", ["dict", "tensor"])
def test_a_whole_batch_instead_of_micro_batches_is_refused_in_one_line(whole: str) -> None:
    """Iterating a dict gives its keys ("string indices must be integers" in the loss), a tensor
    its rows: both are refused before any forward, with what to pass instead."""
    model = TinyLM()
    before = copy.deepcopy(model)
    acc = Accumulator(model, OPTIMIZERS["sgd"](model))
    batch = lm_batch(4) if whole == "dict" else torch.randint(0, 32, (4, 12))
    with pytest.raises(bigbatch.BigBatchError) as info:
        acc.step(batch, lm_loss)
    message = str(info.value)
    assert "\n" not in message
    assert f"got one whole batch ({'dict' if whole == 'dict' else 'Tensor'})" in message
    assert ".split(batch)" in message and "[batch]" in message
    assert acc.steps_taken == acc.steps_skipped == 0 and max_rel_diff(model, before) == 0.0
    if whole == "dict":  # the same batch as a cycle of one micro-batch is what was meant
        assert not acc.step([batch], lm_loss).skipped


def test_from_mean_with_zero_count_contributes_nothing() -> None:
    model = mlp()
    cycles = make_cycles("mlp", 2, steps=1)

    def loss_fn(m, batch):
        x, y = batch
        if batch is cycles[0][1]:
            return LossSum.from_mean(F.mse_loss(m(x[:0]), y[:0]), 0)  # an empty micro-batch
        return LossSum.from_mean(F.mse_loss(m(x), y), y.numel())

    truth = full_batch_train(model, OPTIMIZERS["sgd"], [cycles[0][:1]], mlp_mean)
    got, _ = train_engine(model, OPTIMIZERS["sgd"], cycles, loss_fn)
    assert max_rel_diff(got, truth) <= RTOL


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_non_finite_gradient_in_fp32(mode: str) -> None:
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accumulator(model, opt, on_nonfinite=mode)
    before = copy.deepcopy(model)
    cycle = make_cycles("mlp", 4, steps=1)[0]
    cycle[2] = (cycle[2][0] * math.inf, cycle[2][1])  # inf input: NaN loss and gradient
    if mode == "raise":
        with pytest.raises(bigbatch.NonFiniteError, match="non-finite loss .* not updated"):
            acc.step(cycle, mlp_loss)
    else:
        stats = acc.step(cycle, mlp_loss)
        assert stats.skipped and stats.skip_reason == "non-finite loss"
    assert max_rel_diff(model, before) == 0.0 and opt.state == {}
    assert all(p.grad is None for p in model.parameters())


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a loss that is finite but blows up."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def test_non_finite_gradient_with_finite_loss_is_skipped() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt)
    before = copy.deepcopy(model)

    def loss_fn(m, batch):
        x, y = batch
        return LossSum(F.mse_loss(_InfGrad.apply(m(x)), y, reduction="sum"), y.numel())

    stats = acc.step(make_cycles("mlp", 2, steps=1)[0], loss_fn)
    assert stats.skipped and stats.skip_reason == "non-finite gradient"
    assert math.isfinite(stats.loss) and not math.isfinite(stats.grad_norm)
    assert max_rel_diff(model, before) == 0.0


def test_stray_gradients_before_a_cycle_are_not_mixed_in() -> None:
    model = mlp()
    cycles = make_cycles("mlp", 2, steps=1)
    truth = full_batch_train(model, OPTIMIZERS["sgd"], cycles, mlp_mean)
    model = copy.deepcopy(model)
    mlp_mean(model, cycles[0][0]).backward()  # a user's probe left .grad behind
    Accumulator(model, OPTIMIZERS["sgd"](model)).step(cycles[0], mlp_loss)
    assert max_rel_diff(model, truth) <= RTOL


def test_exception_mid_cycle_discards_it() -> None:
    model = mlp()
    acc = Accumulator(model, OPTIMIZERS["sgd"](model))
    cycle = make_cycles("mlp", 4, steps=1)[0]

    def failing(m, batch):
        if batch is cycle[2]:
            raise RuntimeError("boom")
        return mlp_loss(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        acc.step(cycle, failing)
    assert acc.micro_step == 0 and all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip() -> None:
    model = mlp()
    cycles = make_cycles("mlp", 2, steps=4)
    a, _ = train_engine(model, OPTIMIZERS["adamw"], cycles, mlp_loss)
    m1 = copy.deepcopy(model)
    opt1 = OPTIMIZERS["adamw"](m1)
    acc1 = Accumulator(m1, opt1)
    for c in cycles[:2]:
        acc1.step(c, mlp_loss)
    state, opt_state = acc1.state_dict(), copy.deepcopy(opt1.state_dict())
    m2 = copy.deepcopy(m1)
    opt2 = OPTIMIZERS["adamw"](m2)
    opt2.load_state_dict(opt_state)
    acc2 = Accumulator(m2, opt2)
    acc2.load_state_dict(state)
    stats = [acc2.step(c, mlp_loss) for c in cycles[2:]]
    assert [s.step for s in stats] == [3, 4]
    assert max_rel_diff(m2, a) == 0.0  # bitwise: the loss prescale was restored too


@pytest.mark.parametrize("precision_dtype", [("fp32", torch.float64), ("bf16", torch.bfloat16)])
def test_state_dict_mid_cycle_resumes_bit_for_bit(precision_dtype) -> None:
    precision, dtype = precision_dtype
    model = mlp().to(dtype)
    cycles = make_cycles("mlp", 4, steps=2)
    cycles = [[tuple(t.to(dtype) for t in b) for b in c] for c in cycles]
    a, _ = train_engine(model, OPTIMIZERS["adamw"], cycles, mlp_loss, precision=precision)

    m1 = copy.deepcopy(model)
    opt1 = OPTIMIZERS["adamw"](m1)
    acc1 = Accumulator(m1, opt1, precision=precision)
    acc1.step(cycles[0], mlp_loss)
    for b in cycles[1][:3]:  # stop after 3 of the 4 micro-batches of the second cycle
        acc1.accumulate(b, mlp_loss)
    state = copy.deepcopy(acc1.state_dict())
    model_state, opt_state = copy.deepcopy(m1.state_dict()), copy.deepcopy(opt1.state_dict())
    assert state["micro"] == 3 and state["count"] == 3 * cycles[1][0][1].numel()

    m2 = copy.deepcopy(model)
    m2.load_state_dict(model_state)
    opt2 = OPTIMIZERS["adamw"](m2)
    opt2.load_state_dict(opt_state)
    acc2 = Accumulator(m2, opt2, precision=precision)
    acc2.load_state_dict(state)
    acc2.accumulate(cycles[1][3], mlp_loss)
    stats = acc2.finish()
    assert stats.micro_batches == 4 and stats.step == 2
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), a.parameters()))


def test_load_state_dict_refuses_other_model() -> None:
    model = mlp()
    acc = Accumulator(model, OPTIMIZERS["sgd"](model))
    acc.accumulate(make_cycles("mlp", 2, steps=1)[0][0], mlp_loss)
    state = acc.state_dict()
    other = torch.nn.Linear(6, 3)
    with pytest.raises(bigbatch.BigBatchError, match="does not match this model"):
        Accumulator(other, OPTIMIZERS["sgd"](other)).load_state_dict(state)
