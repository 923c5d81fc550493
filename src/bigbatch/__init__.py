"""bigbatch: gradient accumulation done exactly.

Every loss is a sum and a count; the accumulated gradient is divided by the total count once,
so K micro-batches give the update of one full batch.

The public names below are imported on first use (PEP 562), so ``import bigbatch`` is cheap and
the framework ports (``bigbatch.jax``, ``bigbatch.keras``) can be imported without PyTorch's side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Accumulator": "engine",
    "BatchNormWarning": "engine",
    "BatchPlan": "plan",
    "BatchPlanError": "errors",
    "BigBatchError": "errors",
    "CostModel": "partition",
    "DistributedError": "engine",
    "FrozenBatchNorm": "batchnorm",
    "GradSync": "engine",
    "LossError": "errors",
    "LossSum": "loss",
    "MemoryProfile": "memory",
    "MicroBatchChoice": "planner",
    "NonFiniteError": "errors",
    "OutOfMemory": "memory",
    "PooledBatchNorm": "pooled",
    "StepStats": "engine",
    "contrastive_step": "contrastive",
    "convert_batchnorm": "batchnorm",
    "info_nce": "contrastive",
    "measure_cost": "partition",
    "measure_memory": "memory",
    "pack_batch": "packing",
    "pack_by_tokens": "packing",
    "pack_rows": "rows",
    "partition_by_cost": "partition",
    "plan_micro_batch": "planner",
    "token_cross_entropy": "loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bigbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .batchnorm import FrozenBatchNorm as FrozenBatchNorm
    from .batchnorm import convert_batchnorm as convert_batchnorm
    from .contrastive import contrastive_step as contrastive_step
    from .contrastive import info_nce as info_nce
    from .engine import Accumulator as Accumulator
    from .engine import BatchNormWarning as BatchNormWarning
    from .engine import DistributedError as DistributedError
    from .engine import GradSync as GradSync
    from .engine import StepStats as StepStats
    from .errors import BatchPlanError as BatchPlanError
    from .errors import BigBatchError as BigBatchError
    from .errors import LossError as LossError
    from .errors import NonFiniteError as NonFiniteError
    from .loss import LossSum as LossSum
    from .loss import token_cross_entropy as token_cross_entropy
    from .memory import MemoryProfile as MemoryProfile
    from .memory import OutOfMemory as OutOfMemory
    from .memory import measure_memory as measure_memory
    from .packing import pack_batch as pack_batch
    from .packing import pack_by_tokens as pack_by_tokens
    from .partition import CostModel as CostModel
    from .partition import measure_cost as measure_cost
    from .partition import partition_by_cost as partition_by_cost
    from .plan import BatchPlan as BatchPlan
    from .planner import MicroBatchChoice as MicroBatchChoice
    from .planner import plan_micro_batch as plan_micro_batch
    from .pooled import PooledBatchNorm as PooledBatchNorm
    from .rows import pack_rows as pack_rows
