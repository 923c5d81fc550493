"""The exact accumulation step, compiled: K micro-batches in one ``lax.scan``, one optax update.

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)

The scan carries the gradient sums (float32 accumulators for float32/bf16/fp16 parameters,
float64 for float64 ones), the loss sum and the count; what a padded slot of a short cycle
computes is dropped by a select. With a mesh, each device scans its rows of every micro-batch and
the sums and counts are reduced across devices once per cycle (``psum``). Then the gradient is
divided by the total count, once, and the optimizer — an optax chain, clipping and schedules
included — is applied once, inside a ``lax.cond`` that leaves parameters and optimizer state
untouched when the cycle is empty or anything is NaN/inf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..errors import BigBatchError
from .cycle import Cycle, CycleError
from .loss import check_loss_shape

__all__ = ["GradSums", "StepStats", "accumulate_gradients", "apply_gradient_sums", "make_step"]

LossFn = Callable[[Any, Any], Any]


class GradSums(NamedTuple):
    """What a cycle adds up before the one division: ``Σ_k ∇ sum_k``, ``Σ_k sum_k``,
    ``Σ_k count_k``."""

    grads: Any
    loss_sum: jax.Array
    count: jax.Array


class StepStats(NamedTuple):
    """One optimizer step, as arrays.

    Attributes:
        loss: ``Σ_k sum_k / Σ_k count_k``, the exact mean loss over the cycle (NaN when empty).
        count: ``Σ_k count_k`` over every micro-batch (and device).
        grad_norm: global L2 norm of the normalized gradient ``g``, before any clipping.
        skipped: True when the cycle was empty or its loss or gradient NaN/inf; parameters and
            optimizer state were then left as they were.
    """

    loss: jax.Array
    count: jax.Array
    grad_norm: jax.Array
    skipped: jax.Array


def _float_dtype() -> Any:
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _accumulator(param: jax.Array, accum_dtype: Any) -> jax.Array:
    dtype = accum_dtype or jnp.promote_types(param.dtype, jnp.float32)
    return jnp.zeros(param.shape, dtype)


def accumulate_gradients(loss_fn: LossFn, params: Any, batches: Any, valid: Any = None, *,
                         accum_dtype: Any = None, axis_name: str | None = None) -> GradSums:
    """``Σ_k ∇ sum_k``, ``Σ_k sum_k`` and ``Σ_k count_k`` over stacked micro-batches (a
    ``lax.scan``; traceable, for use inside your own jitted function).

    Args:
        loss_fn: ``loss_fn(params, micro_batch) -> LossSum | (sum, count)``.
        params: the pytree to differentiate.
        batches: pytree whose leaves have a leading axis of K (one slot per micro-batch).
        valid: bool ``[K]`` or None (all valid); an invalid slot adds nothing (it is computed
            and its result dropped by a select, so a short cycle costs the time of a full one
            and no memory beyond the plain scan's).
        accum_dtype: dtype of the gradient sums; default the parameter's dtype promoted to at
            least float32 (bf16 and fp16 parameters accumulate in float32).
        axis_name: inside ``shard_map``, the mesh axis the rows are split over: the sums stay
            this device's own (``psum`` them once, after), instead of being reduced in every
            micro-batch's backward.

    Returns:
        :class:`GradSums`; the count is an integer (int32, or int64 with x64) when the loss's is,
        else float.

    Raises:
        LossError: the loss function does not return a scalar ``(sum, count)``.
        CycleError: the leaves of ``batches`` disagree on K, or ``valid`` is not ``[K]``.
    """
    leaves = jax.tree_util.tree_leaves(batches)
    ks = {x.shape[0] if x.ndim else None for x in leaves}
    if len(ks) != 1 or None in ks:
        raise CycleError(f"stacked micro-batches need one leading axis K on every leaf; got "
                         f"shapes {[tuple(x.shape) for x in leaves]} (use bigbatch.jax.stack)")
    (k,) = ks
    if valid is not None and tuple(jnp.shape(valid)) != (k,):
        raise CycleError(f"valid has shape {tuple(jnp.shape(valid))}; it must be ({k},), one "
                         "flag per micro-batch")
    first = jax.tree_util.tree_map(lambda x: x[0], batches)
    total0, count0 = check_loss_shape(jax.eval_shape(loss_fn, params, first))
    count_dtype = (jnp.int64 if jax.config.jax_enable_x64 else jnp.int32) if jnp.issubdtype(
        count0.dtype, jnp.integer) else _float_dtype()
    sum_dtype = jnp.promote_types(total0.dtype, _float_dtype())
    zeros = GradSums(jax.tree_util.tree_map(lambda p: _accumulator(p, accum_dtype), params),
                     jnp.zeros((), sum_dtype), jnp.zeros((), count_dtype))
    if axis_name is not None:
        # Differentiate a device-varying copy of the replicated parameters: the transpose of an
        # implicit broadcast would otherwise all-reduce the gradient of every micro-batch.
        params, zeros = jax.lax.pcast((params, zeros), axis_name, to="varying")

    def loss_and_count(p: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
        total, count = loss_fn(p, batch)
        return total, count

    def contribution(batch: Any) -> GradSums:
        (total, count), grads = jax.value_and_grad(loss_and_count, has_aux=True)(params, batch)
        grads = jax.tree_util.tree_map(lambda g, z: g.astype(z.dtype), grads, zeros.grads)
        return GradSums(grads, total.astype(sum_dtype), jnp.asarray(count).astype(count_dtype))

    def add(carry: GradSums, batch: Any) -> GradSums:
        return jax.tree_util.tree_map(jnp.add, carry, contribution(batch))

    def body(carry: GradSums, slot: tuple[Any, Any]) -> tuple[GradSums, None]:
        batch, ok = slot
        new = add(carry, batch)
        if ok is None:
            return new, None
        # A select, not a lax.cond: a padded slot is computed and dropped (NaN there is harmless),
        # and the step needs no buffer beyond the plain scan's (a cond copies the carry).
        return jax.tree_util.tree_map(lambda n, c: jnp.where(ok, n, c), new, carry), None

    sums, _ = jax.lax.scan(body, zeros, (batches, valid))
    return sums


def global_norm(tree: Any) -> jax.Array:
    """``sqrt(Σ x²)`` over every leaf of ``tree`` (in each leaf's dtype, summed in the widest)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def cast_like(new: Any, old: Any) -> Any:
    return jax.tree_util.tree_map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype),
                                  new, old)


def apply_gradient_sums(optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                        sums: GradSums) -> tuple[Any, Any, StepStats]:
    """Divide the gradient sums by the count, once, and apply one optimizer update — or nothing
    when the cycle is empty or NaN/inf (a ``lax.cond``). Traceable.

    ``g = sums.grads / sums.count``; the optimizer sees ``g`` in the accumulators' dtype, its new
    state is cast back to the old state's dtypes and the new parameters to theirs.

    Returns:
        ``(params, opt_state, StepStats)``.
    """
    total = sums.count
    grads = jax.tree_util.tree_map(lambda a: a / total.astype(a.dtype), sums.grads)
    loss = sums.loss_sum / total.astype(sums.loss_sum.dtype)
    norm = global_norm(grads)
    ok = (total > 0) & jnp.isfinite(loss) & jnp.isfinite(norm)

    def update(_: None) -> tuple[Any, Any]:
        updates, new_state = optimizer.update(grads, opt_state, params)
        return cast_like(optax.apply_updates(params, updates), params), cast_like(
            new_state, opt_state)

    params, opt_state = jax.lax.cond(ok, update, lambda _: (params, opt_state), None)
    return params, opt_state, StepStats(loss, total, norm, ~ok)


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
              mesh: Mesh | None = None, axis: str = "data", accum_dtype: Any = None,
              donate: bool = False) -> Callable[..., tuple[Any, Any, StepStats]]:
    """Build the jitted step ``step(params, opt_state, micro_batches) -> (params, opt_state,
    stats)``: one exact optimizer step over K micro-batches.

    ``g = (Σ_k ∇ sum_k) / (Σ_k count_k)`` (sums and counts over every micro-batch, and every
    device of ``mesh``), then one ``optimizer.update`` with ``g``: clipping inside the optax chain
    acts on the full-batch gradient and schedules count optimizer steps.

    Args:
        loss_fn: ``loss_fn(params, micro_batch) -> LossSum | (sum, count)``, the loss *summed*
            over the micro-batch's items and how many items that is.
        optimizer: any optax ``GradientTransformation`` (``optimizer.init(params)`` gives
            ``opt_state``).
        mesh: data parallel: every micro-batch's rows (axis 1 of each stacked leaf) are split over
            the devices of ``mesh`` along ``axis``; parameters are replicated. Each device sums
            its rows, and sums and counts are reduced across devices once per cycle.
        axis: the mesh axis the rows are split over.
        accum_dtype: dtype of the gradient sums (default: at least float32, see
            :func:`accumulate_gradients`).
        donate: donate ``params`` and ``opt_state`` to the step (less memory; the arrays passed
            in are deleted, so keep only what the step returns).

    Returns:
        The jitted step. ``micro_batches`` is a :class:`Cycle` (from :func:`stack` or
        :func:`cycles`; padded slots skipped) or a pytree of stacked micro-batches (all valid).
        ``step.lower(...)`` works as for any jitted function (see :func:`step_memory`).

    Raises:
        BigBatchError: ``optimizer`` is not an optax transformation, or ``axis`` is not an axis
            of ``mesh``. When the step is traced: LossError (the loss's output), CycleError (a
            list of micro-batches instead of a stack, or rows a mesh cannot split evenly).
    """
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        raise BigBatchError(f"optimizer is a {type(optimizer).__name__}, not an optax "
                            "GradientTransformation; pass e.g. optax.adamw(1e-3), not optax.adamw")
    if mesh is not None and axis not in mesh.axis_names:
        raise BigBatchError(f"axis {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}; "
                            "pass axis= one of them")

    def local_sums(params: Any, batches: Any, valid: Any) -> GradSums:
        sums = accumulate_gradients(loss_fn, params, batches, valid, accum_dtype=accum_dtype,
                                    axis_name=None if mesh is None else axis)
        return sums if mesh is None else jax.lax.psum(sums, axis)  # once per cycle

    def step(params: Any, opt_state: Any, micro_batches: Any) -> tuple[Any, Any, StepStats]:
        batches, valid = micro_batches if isinstance(micro_batches, Cycle) else (
            micro_batches, None)
        _check_stacked(batches)
        if mesh is None:
            sums = local_sums(params, batches, valid)
        else:
            _check_rows(batches, mesh.shape[axis], axis)
            specs = (P(), jax.tree_util.tree_map(lambda _: P(None, axis), batches),
                     None if valid is None else P())
            sums = jax.shard_map(local_sums, mesh=mesh, in_specs=specs, out_specs=P())(
                params, batches, valid)
        return apply_gradient_sums(optimizer, params, opt_state, sums)

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _check_stacked(batches: Any) -> None:
    if isinstance(batches, list) and len(batches) > 1 and all(
            jax.tree_util.tree_structure(b).num_nodes > 1 for b in batches):
        raise CycleError(f"got a list of {len(batches)} micro-batches; the step takes them "
                         "stacked: pass bigbatch.jax.stack(micro_batches) (or use "
                         "bigbatch.jax.cycles)")


def _check_rows(batches: Any, devices: int, axis: str) -> None:
    shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(batches)]
    bad = [s for s in shapes if len(s) < 2 or s[1] % devices]
    if bad:
        raise CycleError(f"stacked micro-batches of shapes {bad} cannot be split over the "
                         f"{devices} devices of mesh axis {axis!r}: the rows (axis 1) must be a "
                         f"multiple of {devices}; pad the micro-batches with rows your loss does "
                         "not count")
