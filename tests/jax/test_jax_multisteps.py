"""``multi_steps``: the MultiSteps calling convention with a count, equal to the full batch
(float64, 1e-10 of the update), a short last cycle with ``finish=True``, skipped cycles."""

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
    full_batch_train,
    init_params,
    logits,
    token_mean_loss,
    uneven_cycles,
    update_error,
)

import bigbatch.jax as bj  # noqa: E402
from bigbatch.errors import BigBatchError  # noqa: E402


@pytest.fixture(autouse=True)
def x64() -> Iterator[None]:
    with jax.enable_x64(True):
        yield


def sum_loss(params: Any, ids: Any, labels: Any) -> Any:
    return bj.token_cross_entropy(logits(params, ids), labels).sum


def run(opt: Any, cycles: list[Any], grads: str) -> tuple[Any, Any, list[bool]]:
    """The MultiSteps loop: one jitted ``update`` per micro-batch, with its count."""
    grad_fn = jax.grad(sum_loss if grads == "sum" else token_mean_loss)

    @jax.jit
    def micro_step(params: Any, state: Any, m: dict[str, Any], finish: Any) -> tuple[Any, Any]:
        count = jnp.sum(m["labels"] != PAD)
        updates, state = opt.update(grad_fn(params, m["ids"], m["labels"]), state, params,
                                    count=count, finish=finish)
        return optax.apply_updates(params, updates), state

    p0 = init_params()
    params, state, updated = p0, opt.init(p0), []
    for mbs in cycles:
        for i, m in enumerate(mbs):
            params, state = micro_step(params, state, m, i == len(mbs) - 1)
            updated.append(bool(bj.has_updated(state)))
    return p0, params, updated


SLOW = pytest.mark.slow  # the fast subset has the step's cases (test_jax_step.py)


@pytest.mark.parametrize(("grads", "name"), [pytest.param("sum", "sgd", marks=SLOW),
                                             pytest.param("sum", "adamw", marks=SLOW),
                                             pytest.param("mean", "sgd", marks=SLOW)])
def test_multi_steps_equals_the_full_batch(grads: str, name: str) -> None:
    cycles = uneven_cycles(k=4, n_cycles=3, last=2)  # the last cycle ends early (finish=True)
    opt = bj.multi_steps(OPTIMIZERS[name], every_k=4, grads=grads)
    p0, params, updated = run(opt, cycles, grads)
    assert update_error(params, full_batch_train(p0, cycles, name), p0) < 1e-10
    assert updated == [False, False, False, True] * 2 + [False, True]


@SLOW
def test_optax_multisteps_differs_on_the_same_loop() -> None:
    """The negative twin: optax.MultiSteps given the same micro-batches' mean gradients."""
    cycles = uneven_cycles()
    multi = optax.MultiSteps(OPTIMIZER, every_k_schedule=4)

    @jax.jit
    def micro_step(params: Any, state: Any, m: dict[str, Any]) -> tuple[Any, Any]:
        grads = jax.grad(token_mean_loss)(params, m["ids"], m["labels"])
        updates, state = multi.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p0 = init_params()
    params, state = p0, multi.init(p0)
    for mbs in cycles:
        for m in mbs:
            params, state = micro_step(params, state, m)
    assert update_error(params, full_batch_train(p0, cycles), p0) > 1e-3


@SLOW
def test_an_empty_or_nan_cycle_leaves_the_inner_state() -> None:
    opt = bj.multi_steps(OPTIMIZER, every_k=2)
    update = jax.jit(opt.update)
    p0 = init_params()
    state = opt.init(p0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p0)
    updates, state = update(zeros, state, p0, count=0)
    updates, state = update(zeros, state, p0, count=0)  # the cycle's end: nothing counted
    assert not bool(bj.has_updated(state)) and int(state.skipped) == 1
    assert int(state.gradient_step) == 0 and int(state.mini_step) == 0
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates))
    fresh = jax.tree_util.tree_leaves(OPTIMIZER.init(p0))
    assert all(bool(jnp.array_equal(a, b))
               for a, b in zip(jax.tree_util.tree_leaves(state.inner_state), fresh))
    nan = jax.tree_util.tree_map(lambda p: jnp.full_like(p, np.nan), p0)
    _, state = update(nan, state, p0, count=3)
    _, state = update(zeros, state, p0, count=3)
    assert int(state.skipped) == 2 and int(state.gradient_step) == 0
    assert all(bool(jnp.array_equal(a, b))
               for a, b in zip(jax.tree_util.tree_leaves(state.inner_state), fresh))


def test_bad_arguments_are_one_line_errors() -> None:
    for kwargs, match in [({"every_k": 0}, "every_k=0"), ({"every_k": 2.0}, "every_k=2.0"),
                          ({"every_k": 2, "grads": "avg"}, "grads='avg'")]:
        with pytest.raises(BigBatchError, match=match):
            bj.multi_steps(optax.sgd(0.1), **kwargs)
    opt = bj.multi_steps(optax.sgd(0.1), every_k=2)
    p = {"w": jnp.ones(2)}
    with pytest.raises(BigBatchError, match="needs count="):
        opt.update(p, opt.init(p), p)
    with pytest.raises(BigBatchError, match="as an integer"):
        opt.update(p, opt.init(p), p, count=2.5)
