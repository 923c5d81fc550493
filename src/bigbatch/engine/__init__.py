"""The engine: :class:`Accumulator` (the rule, :mod:`.core`) and what is composed around it —
precision (:mod:`.precision`), out-of-memory runners (:mod:`.runner`), gradient sync
(:mod:`.sync`) and features that ride along a cycle (:mod:`.features`)."""

from ..errors import NonFiniteError
from .core import Accumulator, LossFn
from .features import BatchNormWarning
from .stats import StepStats
from .sync import DistributedError, GradSync

__all__ = ["Accumulator", "BatchNormWarning", "DistributedError", "GradSync", "LossFn",
           "NonFiniteError", "StepStats"]
