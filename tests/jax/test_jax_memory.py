"""Memory from the compiled step's analysis, and the largest micro-batch that fits a budget."""

from __future__ import annotations

from typing import Any

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
from jax_reference import SEQ, init_params, logits  # noqa: E402

import bigbatch.jax as bj  # noqa: E402
from bigbatch.errors import BigBatchError  # noqa: E402

pytestmark = [pytest.mark.slow]

GLOBAL = 32


def loss_fn(params: Any, batch: dict[str, Any]) -> bj.LossSum:
    return bj.token_cross_entropy(logits(params, batch["ids"]), batch["labels"])


def cycle_for(micro: int) -> Any:
    """The shapes of a global batch of 32 rows as K = 32 / micro micro-batches."""
    shape = (GLOBAL // micro, micro, SEQ)
    return bj.Cycle({"ids": jax.ShapeDtypeStruct(shape, jnp.int32),
                     "labels": jax.ShapeDtypeStruct(shape, jnp.int32)},
                    jax.ShapeDtypeStruct((GLOBAL // micro,), jnp.bool_))


def test_smaller_micro_batches_need_less_and_the_helper_picks_the_largest_that_fits() -> None:
    opt = optax.adam(1e-3)
    params = init_params()
    state = jax.eval_shape(opt.init, params)
    step = bj.make_step(loss_fn, opt)
    mem = {m: bj.step_memory(step, params, state, cycle_for(m)) for m in (32, 8, 2)}
    assert all(x.argument > 0 and x.output > 0 and x.peak >= x.argument for x in mem.values())
    assert mem[32].temp > mem[8].temp > mem[2].temp  # activations of one micro-batch at a time
    budget = (mem[8].peak + mem[32].peak) // 2
    fit = bj.largest_micro_batch(step, params, state, cycle_for, budget, [2, 8, 32])
    assert fit.micro == 8 and fit.memory == mem[8] and list(fit.tried) == [32, 8]
    with pytest.raises(bj.BudgetError, match=r"^no micro-batch fits .* the smallest, 2, needs"):
        bj.largest_micro_batch(step, params, state, cycle_for, mem[2].peak - 1, [2, 8, 32])
    with pytest.raises(BigBatchError, match="budget="):
        bj.largest_micro_batch(step, params, state, cycle_for, 0, [2])
    with pytest.raises(BigBatchError, match="jitted function"):
        bj.step_memory(loss_fn, params)
