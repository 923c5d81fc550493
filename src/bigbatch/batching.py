"""Nested batches: count their rows, slice them, take rows from them.

A *batch* is a tensor, or a mapping / tuple / list (a NamedTuple included) nesting batches, whose
tensors all share dimension 0, the *rows* (samples). The helpers keep the structure: a slice of a
``{"input_ids": ..., "labels": ...}`` is such a dict again, a tokenizer's ``BatchEncoding`` stays a
``BatchEncoding`` where it can be rebuilt, a NamedTuple stays that NamedTuple. Leaves that are not
tensors (a list of strings, a number) cannot be split row by row and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch

from .errors import BatchPlanError

__all__ = ["batch_rows", "slice_rows", "take_rows"]

B = TypeVar("B")


def batch_rows(batch: Any, where: str = "batch") -> int | None:
    """The common dimension-0 size of every tensor in ``batch`` (None when it holds none).

    Args:
        batch: a tensor, or a mapping / tuple / list nesting tensors.
        where: how to name ``batch`` in error messages.

    Raises:
        BatchPlanError: a 0-d tensor, a leaf that is not a tensor, or tensors whose row counts
            differ (the message names both places).
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise BatchPlanError(f"cannot split {where}: it is a 0-d tensor with no rows")
        return batch.shape[0]
    if type(batch) is dict:  # the common case, once per micro-batch: no names unless wrong
        sizes = {v.shape[0] for v in batch.values() if type(v) is torch.Tensor and v.dim()}
        if len(sizes) == 1 and all(type(v) is torch.Tensor and v.dim() for v in batch.values()):
            return sizes.pop()
    if isinstance(batch, Mapping):
        items: Iterable[tuple[str, Any]] = ((f"{where}[{k!r}]", v) for k, v in batch.items())
    elif isinstance(batch, (tuple, list)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(batch))
    else:
        raise BatchPlanError(
            f"cannot split {where} of type {type(batch).__name__}; a batch must be a tensor or a "
            "dict/tuple/list of tensors"
        )
    rows: int | None = None
    first = ""
    for name, value in items:
        n = batch_rows(value, name)
        if n is None:
            continue
        if rows is None:
            rows, first = n, name
        elif n != rows:
            raise BatchPlanError(f"cannot split: {first} has {rows} rows but {name} has {n}")
    return rows


def slice_rows(batch: B, start: int, stop: int) -> B:
    """Rows ``start:stop`` of every tensor in ``batch`` (views), the structure kept."""
    return _map(batch, lambda t: t[start:stop])


def take_rows(batch: B, index: torch.Tensor) -> B:
    """The rows ``index`` (a 1-D integer tensor) of every tensor in ``batch``, in that order."""
    return _map(batch, lambda t: t.index_select(0, index.to(t.device)))


def _map(batch: Any, fn: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        mapped = {k: _map(v, fn) for k, v in batch.items()}
        return mapped if type(batch) is dict else _rebuild(batch, mapped)
    values = [_map(v, fn) for v in batch]
    if hasattr(batch, "_fields"):  # a NamedTuple takes its fields positionally
        return type(batch)(*values)
    return type(batch)(values)


def _rebuild(batch: Mapping, mapped: dict) -> Any:
    """Keep a mapping's own type (OrderedDict, a tokenizer's batch class) when it can be rebuilt."""
    try:
        return type(batch)(mapped)
    except TypeError:
        return mapped
