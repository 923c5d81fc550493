"""bigbatch: gradient accumulation done exactly.

Every loss is a sum and a count; the accumulated gradient is divided by the total count once,
so K micro-batches give the update of one full batch.
"""

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
from .plan import BatchPlan as BatchPlan
from .planner import MicroBatchChoice as MicroBatchChoice
from .planner import plan_micro_batch as plan_micro_batch
from .pooled import PooledBatchNorm as PooledBatchNorm

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "BatchNormWarning",
    "BatchPlan",
    "BatchPlanError",
    "BigBatchError",
    "DistributedError",
    "FrozenBatchNorm",
    "GradSync",
    "LossError",
    "LossSum",
    "MemoryProfile",
    "MicroBatchChoice",
    "NonFiniteError",
    "OutOfMemory",
    "PooledBatchNorm",
    "StepStats",
    "contrastive_step",
    "convert_batchnorm",
    "info_nce",
    "measure_memory",
    "pack_batch",
    "pack_by_tokens",
    "plan_micro_batch",
    "token_cross_entropy",
]
