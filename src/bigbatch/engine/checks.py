"""The engine's refusals: arguments it cannot run with, a whole batch where a cycle of
micro-batches belongs, loss sums it cannot backpropagate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import BigBatchError, LossError
from ..loss import LossSum

__all__ = ["as_cycle", "check_args", "refuse_gradless"]


def check_args(model: Any, optimizer: Any, clip: Any, on_nonfinite: Any) -> torch.device:
    """Refuse what the engine cannot run; returns the model's device."""
    if not isinstance(model, torch.nn.Module):
        raise BigBatchError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise BigBatchError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if clip is not None and not (isinstance(clip, (int, float)) and 0 < clip < math.inf):
        raise BigBatchError(
            f"clip_grad_norm must be a positive finite number or None, got {clip!r}")
    if on_nonfinite not in ("skip", "stop", "raise"):
        raise BigBatchError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}")
    param = next(model.parameters(), None)
    if param is None:
        raise BigBatchError("model has no parameters to train")
    return param.device


def as_cycle(micro_batches: Any, materialize: bool) -> Any:
    """``micro_batches`` (a list when ``materialize``), unless it is one whole batch.

    Iterating a dict gives its keys and a tensor its rows: either would reach the loss function
    as a "micro-batch" and fail there with an error that does not name the mistake.
    """
    if isinstance(micro_batches, (Mapping, torch.Tensor, str, bytes)) or not isinstance(
            micro_batches, Iterable):
        kind = "dict" if isinstance(micro_batches, Mapping) else type(micro_batches).__name__
        raise BigBatchError(
            f"step() takes one cycle's micro-batches (a list of batches), got one whole batch "
            f"({kind}); split it with bigbatch.BatchPlan(global_batch=G, micro_batch=M)"
            ".split(batch), or pass [batch] for a cycle of one micro-batch")
    return list(micro_batches) if materialize else micro_batches


def refuse_gradless(ls: LossSum, in_group: bool) -> None:
    """A sum without gradient is allowed for an empty micro-batch outside a process group only."""
    if in_group:
        raise LossError(
            "loss_fn returned a LossSum whose sum carries no gradient; under DDP/FSDP2 every "
            "micro-batch must backpropagate (the other ranks wait for its gradient sync): return "
            "a masked sum of the forward's output, which is 0 with a graph")
    if not (isinstance(ls.count, int) and ls.count == 0):
        raise LossError(
            "loss_fn returned a LossSum whose sum carries no gradient (was it detached or computed "
            "under torch.no_grad?); only an empty micro-batch (count 0) may do that")
