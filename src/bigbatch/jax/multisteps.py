"""The exact rule in optax's ``MultiSteps`` calling convention: ``update`` once per micro-batch,
with its count.

``optax.MultiSteps`` keeps a running mean of the gradients it is handed, so each micro-batch weighs
the same whatever it holds. :func:`multi_steps` keeps the sum of the micro-batches' gradient sums
and of their counts instead, and on the cycle's last micro-batch hands the inner optimizer

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)

once. A loop written for ``MultiSteps`` switches by building the optimizer with
:func:`multi_steps` and passing ``count=`` to ``update``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import BigBatchError
from .step import cast_like, global_norm

__all__ = ["MultiStepsState", "has_updated", "multi_steps"]


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`.

    Attributes:
        mini_step: micro-batches added to the current cycle.
        gradient_step: optimizer steps taken (skipped cycles not counted).
        skipped: cycles skipped (empty, or NaN/inf).
        count: ``Σ_k count_k`` of the current cycle.
        acc_grads: ``Σ_k ∇ sum_k`` of the current cycle (float32 or wider).
        inner_state: the inner optimizer's state, touched once per optimizer step.
        updated: whether the last ``update`` applied an optimizer step.
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    skipped: jax.Array
    count: jax.Array
    acc_grads: Any
    inner_state: Any
    updated: jax.Array


def has_updated(state: MultiStepsState) -> jax.Array:
    """Whether the ``update`` that returned ``state`` applied an optimizer step."""
    return state.updated


def multi_steps(inner: optax.GradientTransformation, every_k: int, *, grads: str = "sum",
                accum_dtype: Any = None) -> optax.GradientTransformationExtraArgs:
    """Accumulate ``every_k`` micro-batches exactly, then apply ``inner`` once.

    ``update(grads, state, params=None, *, count, finish=False)`` adds one micro-batch:
    ``acc += grads`` (``grads="sum"``: the gradient of the micro-batch's loss *sum*) or
    ``acc += count · grads`` (``grads="mean"``: the gradient of its mean over ``count`` items), and
    ``n += count``. On the ``every_k``-th call — or any call with ``finish=True``, for a short last
    cycle — ``inner`` gets ``acc / n`` once (unless ``n`` is 0 or anything is NaN/inf: the cycle is
    then dropped and ``inner``'s state left as it was) and the returned updates are its updates;
    on the other calls they are zeros. All in ``lax.cond``: jit-friendly.

    Args:
        inner: the optimizer to apply once per cycle (clipping and schedules inside it see the
            full-batch gradient and count optimizer steps).
        every_k: micro-batches per optimizer step.
        grads: ``"sum"`` or ``"mean"``: what the gradients handed to ``update`` are of.
        accum_dtype: dtype of the accumulators (default: at least float32).

    Returns:
        An optax ``GradientTransformationExtraArgs``.

    Raises:
        BigBatchError: ``every_k`` is not an int >= 1 or ``grads`` not ``"sum"``/``"mean"``; at
            ``update``, a missing ``count``.
    """
    if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
        raise BigBatchError(f"every_k={every_k!r}: give the number of micro-batches per "
                            "optimizer step, an int >= 1")
    if grads not in ("sum", "mean"):
        raise BigBatchError(f"grads={grads!r}: say what update() is handed, 'sum' (gradient of "
                            "the loss sum) or 'mean' (gradient of the mean over count items)")
    inner = optax.with_extra_args_support(inner)

    def init(params: Any) -> MultiStepsState:
        acc = jax.tree_util.tree_map(
            lambda p: jnp.zeros(jnp.shape(p), accum_dtype or jnp.promote_types(
                jnp.result_type(p), jnp.float32)), params)
        zero = jnp.zeros((), jnp.int32)
        count_dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        return MultiStepsState(zero, zero, zero, jnp.zeros((), count_dtype), acc,
                               inner.init(params), jnp.zeros((), bool))

    def update(updates: Any, state: MultiStepsState, params: Any = None, *, count: Any = None,
               finish: Any = False, **extra_args: Any) -> tuple[Any, MultiStepsState]:
        if count is None:
            raise BigBatchError("multi_steps: update() needs count=, how many items the "
                                "micro-batch's loss covers (e.g. its non-padding tokens)")
        if not jnp.issubdtype(jnp.result_type(count), jnp.integer):
            raise BigBatchError(f"multi_steps: count has dtype {jnp.result_type(count)}; give "
                                "the number of items as an integer (e.g. mask.sum())")
        n = jnp.asarray(count).astype(state.count.dtype)
        scale = n if grads == "mean" else 1
        acc = jax.tree_util.tree_map(lambda a, g: a + scale * g.astype(a.dtype),
                                     state.acc_grads, updates)
        total = state.count + n
        mini = state.mini_step + 1
        emit = (mini >= every_k) | jnp.asarray(finish)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, updates)

        def step(_: None) -> tuple[Any, Any, jax.Array]:
            g = jax.tree_util.tree_map(lambda a: a / total.astype(a.dtype), acc)
            ok = (total > 0) & jnp.isfinite(global_norm(g))

            def apply(_: None) -> tuple[Any, Any]:
                new, inner_state = inner.update(g, state.inner_state, params, **extra_args)
                return cast_like(new, updates), cast_like(inner_state, state.inner_state)

            out, inner_state = jax.lax.cond(ok, apply, lambda _: (zeros, state.inner_state),
                                            None)
            return out, inner_state, ok

        out, inner_state, ok = jax.lax.cond(
            emit, step, lambda _: (zeros, state.inner_state, jnp.zeros((), bool)), None)
        keep = ~emit
        new_state = MultiStepsState(
            mini_step=jnp.where(emit, 0, mini).astype(jnp.int32),
            gradient_step=state.gradient_step + ok.astype(jnp.int32),
            skipped=state.skipped + (emit & ~ok).astype(jnp.int32),
            count=jnp.where(keep, total, 0).astype(state.count.dtype),
            acc_grads=jax.tree_util.tree_map(lambda a: jnp.where(keep, a, 0).astype(a.dtype), acc),
            inner_state=inner_state, updated=ok)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init, update)
