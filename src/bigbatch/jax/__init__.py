"""bigbatch for JAX: exact gradient accumulation as one compiled step, with optax (and Flax).

Every loss is a sum and a count. The step scans the K micro-batches of a cycle (``lax.scan``),
adds up the gradients of the loss sums and the counts, divides once by the total count and
applies one optax update:

    g = (Σ_k ∇ sum_k) / (Σ_k count_k)

This subpackage imports JAX and optax, never PyTorch nor the rest of bigbatch (bar its error
types). Install with ``pip install "bigbatch[jax]"``.

    step = bigbatch.jax.make_step(loss_fn, optimizer)              # jitted
    for cycle in bigbatch.jax.cycles(micro_batches, k=8):          # the last one padded
        params, opt_state, stats = step(params, opt_state, cycle)
"""

from __future__ import annotations

from .cycle import Cycle as Cycle
from .cycle import CycleError as CycleError
from .cycle import cycles as cycles
from .cycle import stack as stack
from .loss import IGNORE_INDEX as IGNORE_INDEX
from .loss import LossSum as LossSum
from .loss import token_cross_entropy as token_cross_entropy
from .memory import BudgetError as BudgetError
from .memory import MicroBatchFit as MicroBatchFit
from .memory import StepMemory as StepMemory
from .memory import largest_micro_batch as largest_micro_batch
from .memory import step_memory as step_memory
from .multisteps import MultiStepsState as MultiStepsState
from .multisteps import has_updated as has_updated
from .multisteps import multi_steps as multi_steps
from .parallel import shard_cycle as shard_cycle
from .step import GradSums as GradSums
from .step import StepStats as StepStats
from .step import accumulate_gradients as accumulate_gradients
from .step import apply_gradient_sums as apply_gradient_sums
from .step import make_step as make_step

__all__ = [
    "IGNORE_INDEX",
    "BudgetError",
    "Cycle",
    "CycleError",
    "GradSums",
    "LossSum",
    "MicroBatchFit",
    "MultiStepsState",
    "StepMemory",
    "StepStats",
    "accumulate_gradients",
    "apply_gradient_sums",
    "cycles",
    "has_updated",
    "largest_micro_batch",
    "make_step",
    "multi_steps",
    "shard_cycle",
    "stack",
    "step_memory",
    "token_cross_entropy",
]
