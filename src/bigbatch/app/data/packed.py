"""Token-budget micro-batches of the command's samples, as ``--pack`` says (see
:mod:`bigbatch.app.packmode`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...packing import pack_by_tokens, trim_padding
from ...partition import CostModel, partition_by_cost
from ...rows import pack_rows
from .windows import TokenWindows

__all__ = ["packed_micro_batches"]


def packed_micro_batches(
    windows: TokenWindows,
    rows: torch.Tensor | Sequence[int],
    max_tokens: int,
    device: torch.device | str | None = None,
    *,
    mode: str = "tokens",
    cost: CostModel | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The token-budget micro-batches of one global batch of samples (:class:`TokenWindows`,
    or any samples with ``batch`` and ``lengths``).

    ``rows`` are the global batch's sample indices (e.g. one item of
    :func:`~bigbatch.app.data.global_batches`, or a process's share of it). With ``mode``
    ``"tokens"`` they are grouped by :func:`pack_by_tokens` on :meth:`TokenWindows.lengths`
    (``"partition"``: by :func:`~bigbatch.partition_by_cost` under ``cost``), and each group
    becomes ``windows.batch(rows[group])`` cut to the group's longest sample; with ``"rows"``
    they are packed into padding-free rows by :func:`~bigbatch.pack_rows`. Together the
    micro-batches hold exactly the real tokens of ``windows.batch(rows)``, so the accumulated
    update is the same.

    Args:
        windows: the samples.
        rows: sample indices of one global batch, a 1-D tensor or sequence of ints.
        max_tokens: padded token positions per micro-batch (rows × columns); at least the
            longest sample's length (``windows.seq_len`` is always enough).
        device: where to put the tensors (default: leave them on the CPU).

    Returns:
        ``[{"input_ids": LongTensor[b, t], "labels": LongTensor[b, t], ...}, ...]`` with
        ``b × t <= max_tokens`` each, longest samples first (``"rows"``: with
        ``position_ids``).

    Raises:
        IndexError: an index is out of range.
        PackingError: as in :func:`pack_by_tokens`.
    """
    idx = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
    if mode == "rows":
        out = pack_rows(windows.batch(idx), max_tokens)
    else:
        lengths = windows.lengths(idx)
        groups = (partition_by_cost(lengths, max_tokens, cost)  # type: ignore[arg-type]
                  if mode == "partition" else pack_by_tokens(lengths, max_tokens))
        out = [trim_padding(windows.batch(idx[g]), max(int(lengths[g].max()), 1))
               for g in groups]
    return [{k: v.contiguous().to(device) if device is not None else v.contiguous()
             for k, v in micro.items()} for micro in out]
