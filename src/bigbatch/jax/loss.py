"""Losses as a sum and a count, in JAX.

A micro-batch's loss function returns :class:`LossSum` — the loss summed over the items it covers
and how many items that is — or a plain ``(sum, count)`` pair. The step differentiates the sums
and divides the accumulated gradient once by the cycle's total count:

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..errors import LossError

__all__ = ["IGNORE_INDEX", "LossSum", "check_loss_shape", "token_cross_entropy"]

IGNORE_INDEX = -100
"""The label value that marks padding: left out of the sum and the count."""


class LossSum(NamedTuple):
    """A summed loss and the number of items the sum covers (a pytree: a pair of arrays).

    Attributes:
        sum: scalar float array, the loss summed over the items.
        count: scalar, how many items (tokens, rows, …) ``sum`` covers; an integer array (exact
            at any size) or a float one (weights).
    """

    sum: jax.Array
    count: jax.Array

    @classmethod
    def from_mean(cls, mean: jax.Array, count: jax.Array | int) -> LossSum:
        """Adapt a mean-reduced loss: ``sum = mean × count`` (exact when ``mean`` averages exactly
        ``count`` items; an empty micro-batch's mean is NaN, so prefer a summed loss there)."""
        return cls(mean * count, jnp.asarray(count))


def token_cross_entropy(logits: jax.Array, labels: jax.Array,
                        ignore_index: int = IGNORE_INDEX) -> LossSum:
    """Summed cross-entropy over the labels that are not ``ignore_index``, and their count.

    ``sum = Σ_{i: labels_i ≠ ignore_index} −log softmax(logits_i)[labels_i]``,
    ``count = #{i: labels_i ≠ ignore_index}``; computed in at least float32.

    Args:
        logits: ``[..., vocab]`` unnormalized scores.
        labels: ``[...]`` integer targets, the leading shape of ``logits``. Shift them yourself for
            next-token prediction (``logits[:, :-1]`` against ``labels[:, 1:]``).
        ignore_index: label value that marks padding and other positions to leave out.

    Returns:
        :class:`LossSum`: a scalar float sum and a scalar integer count.

    Raises:
        LossError: the shapes of ``logits`` and ``labels`` do not line up.
    """
    if logits.shape[:-1] != labels.shape:
        raise LossError(f"logits shape {tuple(logits.shape)} does not match labels shape "
                        f"{tuple(labels.shape)}: expected logits [..., vocab] with labels [...]")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    keep = labels != ignore_index
    logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return LossSum(-jnp.sum(jnp.where(keep, picked, 0.0)), jnp.sum(keep))


def check_loss_shape(out: Any) -> tuple[Any, Any]:
    """The ``(sum, count)`` shapes of what a loss function returned (under ``jax.eval_shape``).

    Raises:
        LossError: not a pair, the sum is not a real floating scalar, or the count not a scalar.
    """
    hint = ("return bigbatch.jax.LossSum(sum, count) or a (sum, count) pair: the loss summed "
            "over the micro-batch's items and how many items that is")
    if not isinstance(out, tuple) or len(out) != 2:
        raise LossError(f"the loss function returned {type(out).__name__}; {hint}")
    total, count = out
    if getattr(total, "shape", None) != () or not jnp.issubdtype(total.dtype, jnp.floating):
        raise LossError(f"the loss sum has shape {getattr(total, 'shape', '?')} and dtype "
                        f"{getattr(total, 'dtype', type(total).__name__)}; it must be a real "
                        f"floating scalar ({hint})")
    if getattr(count, "shape", None) != () or not (
            jnp.issubdtype(count.dtype, jnp.integer) or jnp.issubdtype(count.dtype, jnp.floating)):
        raise LossError(f"the loss count has shape {getattr(count, 'shape', '?')} and dtype "
                        f"{getattr(count, 'dtype', type(count).__name__)}; it must be an integer "
                        f"or float scalar ({hint})")
    return total, count
