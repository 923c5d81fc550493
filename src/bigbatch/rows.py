"""Padding-free rows: several samples concatenated into one row, each still seeing only itself.

A padded micro-batch spends compute on padding; a packed row spends none. Sample ``s`` with real
length ``L_s`` occupies columns ``[o_s, o_s + L_s)`` of its row, and

* ``position_ids`` restart at 0 at ``o_s``, so each sample sees the positions it would alone;
* attention is causal *within* a sample only — the model derives the block-diagonal mask from
  the restarts of ``position_ids`` (the built-in GPT does, and so do transformers models given
  ``position_ids`` and no ``attention_mask``, as in their "packed sequence" training);
* labels stay each sample's own. Pre-shifted labels (``labels[t]`` is the token after
  ``input_ids[t]``, what :mod:`bigbatch.app` uses) need nothing more. Unshifted labels
  (``labels == input_ids`` where the loss shifts, the transformers convention) get the first
  label of every sample set to ``ignore_index``: after the shift it would be predicted from the
  previous sample's last token, and in a padded batch it is never predicted at all.

Then every sample's logits equal its logits alone, up to rounding, and the labels counted are
the same set: the sum-and-count loss, and so the accumulated update, is the padded batch's. The
count is the real tokens; padding appears only at the end of a row.

Rows are filled by first-fit decreasing: samples sorted by length, longest first, each put into
the first row with room, a row holding at most ``width`` columns. Rows go into micro-batches of
``max_tokens // width`` rows, each cut to its fullest row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .batching import batch_rows
from .loss import IGNORE_INDEX
from .packing import PackingError, _as_lengths, _check_budget, label_lengths

__all__ = ["fill_rows", "pack_rows", "segment_ids"]


def fill_rows(lengths: torch.Tensor | Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: sample positions per row, each row's lengths summing to at most
    ``width``; rows in the order opened (the longest samples first), samples within a row in
    the order placed. A sample of length 0 takes one column.

    Raises:
        PackingError: bad ``lengths``, ``width`` not a positive integer, or a sample longer than
            ``width``.
    """
    width = _check_budget(width)
    values = [max(v, 1) for v in _as_lengths(lengths)]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(values)), key=lambda i: -values[i]):
        if values[i] > width:
            raise PackingError(f"sample {i} has {values[i]} tokens, more than the row width "
                               f"{width}; give a width >= {values[i]}")
        for r, free in enumerate(room):
            if values[i] <= free:
                rows[r].append(i)
                room[r] -= values[i]
                break
        else:
            rows.append([i])
            room.append(width - values[i])
    return rows


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which sample of its row each column belongs to: a new segment wherever ``position_ids``
    does not continue by 1 (``[[0,1,2,0,1,0]] -> [[0,0,0,1,1,2]]``). ``[B, T] -> [B, T]``."""
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[..., :1] - 1)
    return (step != 1).cumsum(-1)


def pack_rows(batch: Mapping[str, Any], max_tokens: int, *, width: int | None = None,
              labels_shifted: bool = True, ignore_index: int = IGNORE_INDEX,
              ) -> list[dict[str, torch.Tensor]]:
    """Regroup one padded global batch into micro-batches of padding-free rows.

    Args:
        batch: ``{"input_ids": [B, T], "labels": [B, T], ...}`` with padding at the end of each
            row; every tensor with ``T`` columns is packed alike, ``attention_mask`` is dropped
            (the document structure is in ``position_ids``). Sample ``i``'s length is
            :func:`~bigbatch.packing.label_lengths` (one past its last real label).
        max_tokens: token positions per micro-batch at most (rows × columns), as for
            :func:`~bigbatch.pack_batch`.
        width: columns per row (default: the longest sample, so every sample fits one row);
            at most ``max_tokens``.
        labels_shifted: ``True`` when ``labels[t]`` is the target of position ``t`` (already
            shifted); ``False`` when the loss shifts them, so each sample's first label is
            masked (see the module docstring).
        ignore_index: the label value of padding.

    Returns:
        ``[{"input_ids", "labels", "position_ids", ...}, ...]``, each ``[r, w]`` with
        ``r × w <= max_tokens``. Columns past a row's last sample are padding: input 0 (the
        batch's own padding value is not known), label ``ignore_index``, positions restarting at
        0 (a segment of their own).

    Raises:
        PackingError: no ``labels`` tensor; a tensor other than ``[B, T, ...]`` per-token data
            (a per-sample label cannot be split across rows: use ``pack_batch``); a bad budget or
            width.
        BatchPlanError: a tensor's rows differ from the labels'.
    """
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        raise PackingError(f"the batch has no 'labels' tensor of shape [batch, time] (keys: "
                           f"{sorted(map(str, batch))}); give a padded token batch")
    batch_rows(batch)
    columns = labels.shape[1]
    per_token = {k: v for k, v in batch.items() if k != "attention_mask"}
    for k, v in per_token.items():
        if not (isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == columns):
            raise PackingError(f"batch[{k!r}] is not a [batch, {columns}, ...] per-token tensor; "
                               "padding-free rows pack token sequences only — use "
                               "pack_batch(..., mode='partition') for per-sample data")
    budget = _check_budget(max_tokens)
    lengths = label_lengths(labels, ignore_index).cpu().tolist()
    if not lengths:
        return []
    width = max(max(lengths), 1) if width is None else _check_budget(width)
    if width > budget:
        raise PackingError(f"row width {width} is more than max_tokens {budget}; give "
                           f"max_tokens >= {width}")
    rows = fill_rows(lengths, width)
    per_micro = budget // width
    out = []
    for start in range(0, len(rows), per_micro):
        group = rows[start:start + per_micro]
        out.append(_build(per_token, lengths, group, labels_shifted, ignore_index))
    return out


def _build(batch: Mapping[str, torch.Tensor], lengths: list[int], rows: list[list[int]],
           labels_shifted: bool, ignore_index: int) -> dict[str, torch.Tensor]:
    """One micro-batch of packed ``rows`` (sample positions), cut to its fullest row."""
    sizes = [[max(lengths[i], 1) for i in row] for row in rows]
    w = max(sum(s) for s in sizes)
    labels = batch["labels"]
    out: dict[str, torch.Tensor] = {}
    for k, v in batch.items():
        fill = ignore_index if k == "labels" else 0
        packed = v.new_full((len(rows), w, *v.shape[2:]), fill)
        for r, (row, size) in enumerate(zip(rows, sizes)):
            o = 0
            for i, n in zip(row, size):
                packed[r, o:o + n] = v[i, :n]
                if k == "labels" and not labels_shifted:
                    packed[r, o] = ignore_index
                o += n
        out[k] = packed
    positions = torch.zeros(len(rows), w, dtype=torch.int64, device=labels.device)
    for r, size in enumerate(sizes):
        o = 0
        for n in [*size, w - sum(size)]:
            positions[r, o:o + n] = torch.arange(n, device=labels.device)
            o += n
    out["position_ids"] = positions
    return out
