"""A cycle: the K micro-batches of one optimizer step, stacked, with a validity mask.

The compiled step scans a stack of micro-batches (every leaf has a leading axis of K). A short
last cycle is padded up to K with copies of zeros and marked in ``valid``: padded slots run no
forward and add nothing, so the step is exact for the micro-batches the cycle holds and is
compiled once for every cycle of the same shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BigBatchError

__all__ = ["Cycle", "CycleError", "cycles", "stack"]


class CycleError(BigBatchError):
    """Micro-batches that cannot be stacked into a cycle, or that a mesh cannot share."""


class Cycle(NamedTuple):
    """The micro-batches of one optimizer step.

    Attributes:
        batches: a pytree whose every leaf has shape ``[K, ...]``: micro-batch ``k`` is
            ``tree_map(lambda x: x[k], batches)``.
        valid: bool ``[K]``; ``False`` marks a padded slot, which contributes nothing.
    """

    batches: Any
    valid: Any


def _check_k(k: Any) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise CycleError(f"k={k!r}: a cycle needs at least 1 micro-batch; give an int k >= 1")


def _shapes(batch: Any) -> list[tuple[tuple[int, ...], Any]]:
    return [(np.shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
            for x in jax.tree_util.tree_leaves(batch)]


def stack(micro_batches: Sequence[Any], k: int | None = None) -> Cycle:
    """Stack micro-batches (pytrees of arrays, all of one structure and shape) into a :class:`Cycle`
    of ``k`` slots, the missing ones padded with zeros and marked invalid.

    Args:
        micro_batches: between 1 and ``k`` micro-batches.
        k: slots in the cycle (default: as many as given). Give the nominal K for a short last
            cycle, so its shape — and the compiled step — stays the same.

    Returns:
        :class:`Cycle`: of ``jax.Array`` s when the micro-batches hold any (stacked on their
        device), else of numpy arrays (``jit`` moves them to the device).

    Raises:
        CycleError: none given, more than ``k``, or micro-batches of different structure or shape
            (pad a short micro-batch to the common shape with items your loss does not count,
            e.g. labels of -100).
    """
    micro_batches = list(micro_batches)
    k = len(micro_batches) if k is None else k
    _check_k(k)
    if not micro_batches:
        raise CycleError("no micro-batches to stack; give at least one (the last cycle may be "
                         "short: pass k= to pad it)")
    if len(micro_batches) > k:
        raise CycleError(f"{len(micro_batches)} micro-batches do not fit a cycle of k={k}; "
                         f"give at most {k} or a larger k")
    first = jax.tree_util.tree_structure(micro_batches[0])
    shapes = _shapes(micro_batches[0])
    for i, mb in enumerate(micro_batches[1:], start=1):
        if jax.tree_util.tree_structure(mb) != first or _shapes(mb) != shapes:
            raise CycleError(
                f"micro-batch {i} has leaves {_shapes(mb)} where micro-batch 0 has {shapes}; "
                "every micro-batch of a cycle needs the same structure and shapes (pad a short "
                "one with items your loss does not count, e.g. labels of -100)")
    # device arrays stay on their device (jnp); anything else is stacked on the host (numpy)
    on_device = any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(micro_batches))
    xp = jnp if on_device else np
    pad = [jax.tree_util.tree_map(xp.zeros_like, micro_batches[0])] * (k - len(micro_batches))
    batches = jax.tree_util.tree_map(lambda *xs: xp.stack([xp.asarray(x) for x in xs]),
                                     *micro_batches, *pad)
    valid = np.arange(k) < len(micro_batches)
    return Cycle(batches, valid)


def cycles(micro_batches: Iterable[Any], k: int) -> Iterator[Cycle]:
    """Group an iterable of micro-batches into cycles of ``k``; the last, if short, is padded
    (:func:`stack` with ``k``) so that every cycle has the same shape.

    Raises:
        CycleError: ``k`` is not an int >= 1, or the micro-batches cannot be stacked.
    """
    _check_k(k)
    group: list[Any] = []
    for mb in micro_batches:
        group.append(mb)
        if len(group) == k:
            yield stack(group, k)
            group = []
    if group:
        yield stack(group, k)
