"""Placing a cycle on a mesh: each micro-batch's rows split over the devices of one axis.

With one process, :func:`shard_cycle` takes the whole cycle and splits it. With several
(``jax.distributed``), each process passes its own rows — the process-local part of every
micro-batch — and the global arrays are assembled without copying across processes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..errors import BigBatchError
from .cycle import Cycle, CycleError

__all__ = ["shard_cycle"]


def shard_cycle(cycle: Cycle | Any, mesh: Mesh, axis: str = "data") -> Cycle | Any:
    """Put a cycle on ``mesh``: every leaf ``[K, rows, ...]`` split along ``rows`` over ``axis``;
    the validity mask replicated.

    Args:
        cycle: a :class:`Cycle` or a pytree of stacked micro-batches. In a multi-process run, this
            process's rows only (the global rows are all processes' rows, in process order).
        mesh: the device mesh the step was built with.
        axis: the mesh axis of the rows.

    Returns:
        The same structure, of global ``jax.Array`` s.

    Raises:
        BigBatchError: ``axis`` is not an axis of ``mesh``.
        CycleError: a leaf has no rows axis, or its rows are not a multiple of the devices.
    """
    if axis not in mesh.axis_names:
        raise BigBatchError(f"axis {axis!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    rows_sharding = NamedSharding(mesh, P(None, axis))
    replicated = NamedSharding(mesh, P())
    local_devices = mesh.shape[axis] // jax.process_count()

    def place(x: Any, sharding: NamedSharding) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    def rows(x: Any) -> jax.Array:
        shape = np.shape(x)
        if len(shape) < 2 or shape[1] % max(local_devices, 1):
            raise CycleError(f"a stacked leaf of shape {shape} cannot be split over the "
                             f"{mesh.shape[axis]} devices of mesh axis {axis!r}: its rows (axis 1) "
                             "must be a multiple of the devices (per process)")
        return place(x, rows_sharding)

    if isinstance(cycle, Cycle):
        return Cycle(jax.tree_util.tree_map(rows, cycle.batches), place(cycle.valid, replicated))
    return jax.tree_util.tree_map(rows, cycle)
