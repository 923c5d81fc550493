"""The compiled step: K micro-batches equal one full batch (float64, 1e-10 of the update), the
short last cycle, skipped cycles, accumulator dtypes, and the peers' way differing.

The reference (``tests/support/jax_reference.py``) never touches bigbatch: plain ``jax.grad`` of
the token-mean loss over the cycle's concatenated rows, then one optax update.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax_reference import (  # noqa: E402
    OPTIMIZER,
    OPTIMIZERS,
    PAD,
    concat,
    full_batch_train,
    init_params,
    logits,
    token_mean_loss,
    uneven_cycles,
    update_error,
)

import bigbatch.jax as bj  # noqa: E402
from bigbatch.errors import BigBatchError, LossError  # noqa: E402


@pytest.fixture(autouse=True)
def x64() -> Iterator[None]:
    with jax.enable_x64(True):
        yield


def loss_fn(params: Any, batch: dict[str, Any]) -> bj.LossSum:
    return bj.token_cross_entropy(logits(params, batch["ids"]), batch["labels"])


STEPS = {name: bj.make_step(loss_fn, opt) for name, opt in OPTIMIZERS.items()}
STEP = STEPS["adamw"]
mean_grad = jax.jit(jax.grad(token_mean_loss))


def train(step: Any, params: Any, cycles: list[Any], k: int, name: str = "adamw"
          ) -> tuple[Any, list[Any]]:
    state = OPTIMIZERS[name].init(params)
    stats = []
    for mbs in cycles:
        params, state, s = step(params, state, bj.stack(mbs, k))
        stats.append(s)
    return params, stats


def tokens(mbs: list[dict[str, np.ndarray]]) -> int:
    return int(sum((m["labels"] != PAD).sum() for m in mbs))


SLOW = pytest.mark.slow  # the fast subset keeps one case of each claim


@pytest.mark.parametrize(("k", "name"), [pytest.param(1, "adamw", marks=SLOW),
                                         pytest.param(2, "adamw", marks=SLOW),
                                         (4, "adamw"), pytest.param(4, "sgd", marks=SLOW)])
def test_k_micro_batches_equal_the_full_batch(k: int, name: str) -> None:
    cycles = [[{key: np.concatenate([m[key] for m in mbs[i:i + 4 // k]]) for key in mbs[0]}
               for i in range(0, 4, 4 // k)]  # the same rows in K slots
              for mbs in uneven_cycles(k=4, rows=4)]
    p0 = init_params()
    got, stats = train(STEPS[name], p0, cycles, k, name)
    assert update_error(got, full_batch_train(p0, cycles, name), p0) < 1e-10
    assert [int(s.count) for s in stats] == [tokens(mbs) for mbs in cycles]
    assert not any(bool(s.skipped) for s in stats)


def test_the_mean_of_micro_batch_means_differs() -> None:
    """The negative twin: optax.MultiSteps averaging each micro-batch's own token mean."""
    cycles = uneven_cycles()
    p0 = init_params()
    multi = optax.MultiSteps(OPTIMIZER, every_k_schedule=4)

    @jax.jit
    def micro_step(params: Any, state: Any, m: dict[str, Any]) -> tuple[Any, Any]:
        updates, state = multi.update(mean_grad(params, m["ids"], m["labels"]), state, params)
        return optax.apply_updates(params, updates), state

    params, state = p0, multi.init(p0)
    for mbs in cycles:
        for m in mbs:
            params, state = micro_step(params, state, m)
    assert update_error(params, full_batch_train(p0, cycles), p0) > 1e-3


@SLOW
def test_stats_are_the_exact_mean_loss_and_gradient_norm() -> None:
    mbs = uneven_cycles(n_cycles=1)[0]
    p0 = init_params()
    _, _, stats = STEP(p0, OPTIMIZER.init(p0), bj.stack(mbs))
    loss, grads = jax.value_and_grad(token_mean_loss)(p0, *concat(mbs))
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(grads)))
    assert abs(float(stats.loss) - float(loss)) < 1e-12 * float(loss)
    assert abs(float(stats.grad_norm) - float(norm)) < 1e-12 * float(norm)
    assert int(stats.count) == tokens(mbs)


@pytest.mark.parametrize("name", ["adamw", pytest.param("sgd", marks=SLOW)])
def test_a_short_last_cycle_is_exact_and_compiled_once(name: str) -> None:
    cycles = uneven_cycles(k=4, n_cycles=3, last=2)
    traces = []

    def counted(params: Any, batch: Any) -> bj.LossSum:
        traces.append(1)
        return loss_fn(params, batch)

    p0 = init_params()
    step = bj.make_step(counted, OPTIMIZERS[name])
    got, stats = train(step, p0, cycles, 4, name)
    assert update_error(got, full_batch_train(p0, cycles, name), p0) < 1e-10
    assert int(stats[-1].count) == tokens(cycles[-1])
    assert step._cache_size() == 1 and len(traces) == 2  # one trace: eval_shape + the scan body


@SLOW
def test_dividing_a_short_cycle_by_the_nominal_k_differs() -> None:
    """The negative twin of the short cycle: the padded slots counted as micro-batches (each
    micro-batch's token mean divided by the nominal K)."""
    cycles = uneven_cycles(k=4, n_cycles=3, last=2)
    p0 = init_params()
    params, state = p0, OPTIMIZER.init(p0)
    for mbs in cycles:
        grads = [mean_grad(params, m["ids"], m["labels"]) for m in mbs]
        g = jax.tree_util.tree_map(lambda *gs: sum(gs) / 4, *grads)
        updates, state = OPTIMIZER.update(g, state, params)
        params = optax.apply_updates(params, updates)
    assert update_error(params, full_batch_train(p0, cycles), p0) > 1e-3


def scaled_loss(params: Any, batch: dict[str, Any]) -> bj.LossSum:
    total, count = loss_fn(params, batch)
    return bj.LossSum(total * batch["scale"], count)


@SLOW
@pytest.mark.parametrize("bad", ["nan", "empty"])
def test_a_nonfinite_or_empty_cycle_is_skipped_without_a_trace(bad: str) -> None:
    cycles = uneven_cycles()
    good = [[dict(m, scale=np.float64(1.0)) for m in mbs] for mbs in cycles]
    broken = [dict(m) for m in good[1]]
    if bad == "nan":  # one micro-batch's loss (and gradient) NaN
        broken[1]["scale"] = np.float64(np.nan)
    else:  # nothing counted: every label padding
        broken = [dict(m, labels=np.full_like(m["labels"], PAD)) for m in broken]
    p0 = init_params()
    step = bj.make_step(scaled_loss, OPTIMIZER)
    params, state, _ = step(p0, OPTIMIZER.init(p0), bj.stack(good[0]))
    before = jax.tree_util.tree_leaves((params, state))
    params, state, stats = step(params, state, bj.stack(broken))
    assert bool(stats.skipped)
    after = jax.tree_util.tree_leaves((params, state))
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(before, after))
    params, state, _ = step(params, state, bj.stack(good[2]))
    # as if the bad cycle never happened: the schedule and Adam's step count did not move
    assert update_error(params, full_batch_train(p0, [cycles[0], cycles[2]]), p0) < 1e-10


@SLOW
def test_bf16_parameters_get_float32_accumulators() -> None:
    stacked = bj.stack(uneven_cycles(n_cycles=1)[0])
    with jax.enable_x64(False):
        p0 = init_params(dtype=jnp.bfloat16)
        sums = jax.eval_shape(lambda p, c: bj.accumulate_gradients(loss_fn, p, *c), p0, stacked)
        assert {g.dtype for g in jax.tree_util.tree_leaves(sums.grads)} == {jnp.dtype("float32")}
        opt = optax.adamw(1e-2)
        params, state, stats = bj.make_step(loss_fn, opt)(p0, opt.init(p0), stacked)
        assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype("bfloat16")}
        assert jax.tree_util.tree_map(lambda x: x.dtype, state) == jax.tree_util.tree_map(
            lambda x: x.dtype, opt.init(p0))
        assert not bool(stats.skipped)
    sums = jax.eval_shape(lambda p, c: bj.accumulate_gradients(loss_fn, p, *c), init_params(),
                          stacked)  # float64 parameters under x64: float64 sums
    assert {g.dtype for g in jax.tree_util.tree_leaves(sums.grads)} == {jnp.dtype("float64")}


@SLOW
def test_a_pair_works_like_loss_sum_and_a_mean_is_refused() -> None:
    stacked = bj.stack(uneven_cycles(n_cycles=1)[0])
    p0, s0 = init_params(), OPTIMIZER.init(init_params())

    def pair(params: Any, batch: Any) -> tuple[Any, Any]:
        total, count = loss_fn(params, batch)
        return total, count

    def from_mean(params: Any, batch: Any) -> bj.LossSum:
        total, count = loss_fn(params, batch)
        return bj.LossSum.from_mean(total / count, count)

    assert update_error(bj.make_step(pair, OPTIMIZER)(p0, s0, stacked)[0],
                        STEP(p0, s0, stacked)[0], p0) == 0.0
    assert update_error(bj.make_step(from_mean, OPTIMIZER)(p0, s0, stacked)[0],
                        STEP(p0, s0, stacked)[0], p0) < 1e-12
    mean = bj.make_step(lambda p, b: pair(p, b)[0] / pair(p, b)[1], OPTIMIZER)
    with pytest.raises(LossError, match=r"^the loss function returned \w+; return bigbatch"):
        mean(p0, s0, stacked)
    vector = bj.make_step(lambda p, b: (jnp.ones(3) * pair(p, b)[0], pair(p, b)[1]), OPTIMIZER)
    with pytest.raises(LossError, match="floating scalar"):
        vector(p0, s0, stacked)


def test_bad_stacks_are_one_line_errors() -> None:
    mbs = uneven_cycles(n_cycles=1)[0]
    short = dict(mbs[1], ids=mbs[1]["ids"][:2], labels=mbs[1]["labels"][:2])
    for call, match in [(lambda: bj.stack([mbs[0], short]), "same structure and shapes"),
                        (lambda: bj.stack(mbs, k=2), "do not fit a cycle of k=2"),
                        (lambda: bj.stack([], k=2), "no micro-batches"),
                        (lambda: list(bj.cycles(mbs, k=0)), "k >= 1")]:
        with pytest.raises(bj.CycleError, match=match) as err:
            call()
        assert "\n" not in str(err.value) and isinstance(err.value, BigBatchError)
    p0 = init_params()
    with pytest.raises(bj.CycleError, match=r"got a list of 4 micro-batches; .* stack"):
        STEP(p0, OPTIMIZER.init(p0), mbs)
    with pytest.raises(BigBatchError, match="not an optax GradientTransformation"):
        bj.make_step(loss_fn, optax.adamw)
