"""Memory shown, not guessed: what XLA says a compiled step needs, and the largest micro-batch
whose step fits a budget.

Nothing runs and nothing is allocated: the step is lowered and compiled for the shapes (arrays or
``jax.ShapeDtypeStruct``), and the compiled executable's ``memory_analysis()`` is read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..errors import BigBatchError

__all__ = ["BudgetError", "MicroBatchFit", "StepMemory", "largest_micro_batch", "step_memory"]


class BudgetError(BigBatchError):
    """No micro-batch size's compiled step fits the memory budget."""


class StepMemory(NamedTuple):
    """Bytes of one compiled step, as XLA's buffer assignment counts them.

    Attributes:
        argument: the inputs (parameters, optimizer state, the stacked micro-batches).
        output: the outputs.
        temp: temporaries: activations, gradients, accumulators, the scan's buffers.
        alias: outputs that reuse donated inputs (counted in both ``argument`` and ``output``).
        code: the generated code.
        peak: ``argument + output + temp - alias`` (what must be resident at once; XLA's own
            ``peak_memory_in_bytes`` where it reports a larger one).
    """

    argument: int
    output: int
    temp: int
    alias: int
    code: int
    peak: int


def step_memory(step: Any, *args: Any) -> StepMemory:
    """Compile ``step`` (any jitted function, e.g. from :func:`make_step`) for ``args`` — arrays or
    ``jax.ShapeDtypeStruct`` pytrees — and read its memory analysis.

    Raises:
        BigBatchError: ``step`` is not a jitted function, or this backend reports no analysis.
    """
    if not hasattr(step, "lower"):
        raise BigBatchError(f"step_memory needs a jitted function (with .lower), got "
                            f"{type(step).__name__}; pass the result of make_step or jax.jit")
    stats = step.lower(*args).compile().memory_analysis()
    if stats is None:
        raise BigBatchError("this JAX backend gives no memory analysis for compiled programs")
    arg, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    temp, alias = int(stats.temp_size_in_bytes), int(stats.alias_size_in_bytes)
    peak = max(arg + out + temp - alias, int(getattr(stats, "peak_memory_in_bytes", 0) or 0))
    return StepMemory(arg, out, temp, alias, int(stats.generated_code_size_in_bytes), peak)


class MicroBatchFit(NamedTuple):
    """The answer of :func:`largest_micro_batch`.

    Attributes:
        micro: the largest micro-batch size whose step fits.
        memory: that step's :class:`StepMemory`.
        tried: every size compiled on the way, largest first, with its memory.
    """

    micro: int
    memory: StepMemory
    tried: dict[int, StepMemory]


def largest_micro_batch(step: Any, params: Any, opt_state: Any,
                        cycle_for: Callable[[int], Any], budget: int,
                        candidates: Sequence[int]) -> MicroBatchFit:
    """The largest micro-batch size whose compiled step needs at most ``budget`` bytes.

    Sizes are compiled largest first (each compile takes seconds on a real model) until one fits;
    :attr:`StepMemory.peak` is compared with the budget.

    Args:
        step: the jitted step (:func:`make_step`).
        params, opt_state: arrays or ``jax.ShapeDtypeStruct`` pytrees (``jax.eval_shape``).
        cycle_for: ``cycle_for(micro)`` gives the stacked micro-batches (or their shapes) of a
            cycle of micro-batches of ``micro`` rows, e.g. ``K = global_batch // micro`` of them.
        budget: bytes available to the step.
        candidates: micro-batch sizes to consider.

    Returns:
        :class:`MicroBatchFit`.

    Raises:
        BudgetError: no candidate fits (the message gives the smallest one's bytes).
        BigBatchError: no candidates, or a budget that is not a positive number of bytes.
    """
    sizes = sorted({int(c) for c in candidates}, reverse=True)
    if not sizes or sizes[-1] < 1:
        raise BigBatchError(f"candidates={list(candidates)!r}: give micro-batch sizes >= 1")
    if not isinstance(budget, int) or budget <= 0:
        raise BigBatchError(f"budget={budget!r}: give the bytes available, an int > 0")
    tried: dict[int, StepMemory] = {}
    for micro in sizes:
        tried[micro] = mem = step_memory(step, params, opt_state, cycle_for(micro))
        if mem.peak <= budget:
            return MicroBatchFit(micro, mem, tried)
    smallest = tried[sizes[-1]]
    raise BudgetError(f"no micro-batch fits {budget / 2**20:.1f} MiB: the smallest, {sizes[-1]}, "
                      f"needs {smallest.peak / 2**20:.1f} MiB (its inputs alone, parameters and "
                      f"optimizer state included, {smallest.argument / 2**20:.1f} MiB); raise the "
                      "budget or try smaller micro-batches")
