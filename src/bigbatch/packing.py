"""Micro-batches by token budget: cut a global batch by padded size, not by sample count.

Why any cut is allowed. With losses reported as sums and counts, the engine's update for a global
batch of items ``I`` (tokens, here) split into micro-batches ``P_1, …, P_K`` is

    g = (Σ_k Σ_{i ∈ P_k} ∇ℓ_i) / (Σ_k |P_k|) = (Σ_{i ∈ I} ∇ℓ_i) / |I|

— a sum over the global batch, which does not depend on how the samples are grouped or in which
order the groups run. So the samples of one optimizer step may be regrouped freely: sorted by
length and packed so that each micro-batch is padded only to its own longest sample. The popular
recipe instead averages per-micro-batch means, ``(1/K) Σ_k (1/|P_k|) Σ_{i ∈ P_k} ∇ℓ_i``, which
weights every micro-batch equally whatever its token count; regrouping changes that result, so
it cannot pack without changing what is learned.

Cost model. A micro-batch of rows ``R`` padded to ``T_R = max_{i ∈ R} L_i`` columns holds
``|R| × T_R`` token positions: activations and the work of the per-token layers grow with that
number (attention with ``|R| × T_R²``). :func:`pack_by_tokens` keeps it under a budget, so one
micro-batch never needs more memory than a fixed-size micro-batch of ``max_tokens`` positions,
however the lengths fall; short samples share a micro-batch, long ones get one of their own.

Trimming. A causal language model's output at position ``t`` depends on inputs ``0..t`` only, and
padding positions carry the ignored label, so cutting a padded batch to its longest real sample's
length (:func:`trim_padding`) changes no real position's loss or gradient.

Data parallel. Each rank packs its own share of the global batch, so ranks may end up with
different numbers of micro-batches; they must run the same number per cycle, which
:func:`pad_micro_batches` arranges with empty micro-batches that change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .batching import batch_rows, take_rows
from .errors import BigBatchError
from .loss import IGNORE_INDEX

__all__ = [
    "PACK_MODES",
    "PackingError",
    "label_lengths",
    "pack_batch",
    "pack_by_tokens",
    "pad_micro_batches",
    "trim_padding",
]


class PackingError(BigBatchError):
    """Samples cannot be packed as asked; the one-line message names the value and the fix."""


def _check_budget(max_tokens: object) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise PackingError(
            f"max_tokens must be a positive integer (padded token positions per micro-batch), "
            f"got {max_tokens!r}; give e.g. micro_batch × seq_len"
        )
    return max_tokens


def _as_lengths(lengths: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex() or (
            lengths.dtype == torch.bool
        ):
            raise PackingError(
                f"lengths must be a 1-D integer tensor, got a {lengths.dtype} tensor of shape "
                f"{tuple(lengths.shape)}; give one integer length per sample"
            )
        values = [int(v) for v in lengths.tolist()]
    else:
        values = list(lengths)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int):
                raise PackingError(
                    f"lengths[{i}] is {v!r}, not an integer; give one integer length per sample"
                )
    if values and min(values) < 0:
        i = values.index(min(values))
        raise PackingError(
            f"lengths[{i}] is {values[i]}, a negative length; give each sample's number of real "
            "tokens (>= 0)"
        )
    return values


def pack_by_tokens(lengths: torch.Tensor | Sequence[int], max_tokens: int) -> list[torch.Tensor]:
    """Group samples into micro-batches whose padded size stays within a token budget.

    A group ``R`` is padded to its longest sample, so it costs ``|R| × T_R`` token positions with
    ``T_R = max(1, max_{i ∈ R} L_i)`` (a sample with no real token still takes one column). The
    samples are sorted by length, longest first — a stable sort, so equal lengths keep their
    order in ``lengths`` — and taken in that order into the current group while
    ``(|R| + 1) × T_R <= max_tokens``; otherwise a new group starts. As the first sample of a
    group is its longest, each group holds ``⌊max_tokens / T_R⌋`` samples (the last one possibly
    fewer): among the partitions into runs of the sorted order this is the one with the fewest
    groups, and the padding in a group is only the gaps between neighbours in length.

    The result depends on ``lengths`` and ``max_tokens`` alone. Any grouping gives the same
    exact update (see the module docstring); this one wastes little compute on padding.

    Args:
        lengths: each sample's real length (the columns it needs), e.g.
            :func:`label_lengths` of a global batch (on one
            process: its own share of it). A 1-D integer tensor or a sequence of ints, >= 0.
        max_tokens: the budget of padded token positions per micro-batch, rows × columns. A
            fixed-size micro-batch of ``m`` rows of ``seq_len`` columns holds ``m × seq_len``.

    Returns:
        One ``LongTensor`` per micro-batch holding positions into ``lengths`` (each position in
        exactly one group), the group of the longest samples first and, within a group, longest
        first. Empty when ``lengths`` is.

    Raises:
        PackingError: ``max_tokens`` is not a positive integer; ``lengths`` is not 1-D, holds a
            non-integer or negative value; or a sample is longer than ``max_tokens`` (a row must
            fit into one micro-batch).
    """
    budget = _check_budget(max_tokens)
    values = _as_lengths(lengths)
    if not values:
        return []
    longest = max(values)
    if longest > budget:
        i = values.index(longest)
        raise PackingError(
            f"sample {i} has {longest} tokens, more than max_tokens {budget} (one micro-batch "
            f"must hold a whole sample); give max_tokens >= {longest} or cut samples shorter"
        )
    order = sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties in batch order
    groups: list[list[int]] = []
    width = 0  # columns of the current group: its first (longest) sample's length
    for i in order:
        if groups and (len(groups[-1]) + 1) * width <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
            width = max(values[i], 1)
    return [torch.tensor(g, dtype=torch.int64) for g in groups]


def label_lengths(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Each row's real length: one past its last label that is not ``ignore_index``.

    Cutting the batch to ``label_lengths(labels).max()`` columns drops only ignored labels. An
    ignored label before the last real one (a masked prompt, say) counts as part of the length.

    Args:
        labels: ``[B, T, ...]`` integer targets; a position counts as real when any entry of it
            is not ``ignore_index``.
        ignore_index: the label value of padding.

    Returns:
        ``LongTensor[B]`` with values in ``[0, T]`` (0 for a row with no real label).

    Raises:
        PackingError: ``labels`` has fewer than 2 dimensions.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise PackingError(
            f"labels must be a [batch, time] tensor, got {shape}; give the padded batch's labels"
        )
    rows, width = labels.shape[0], labels.shape[1]
    if rows == 0 or width == 0:
        return torch.zeros(rows, dtype=torch.int64, device=labels.device)
    real = (labels != ignore_index).reshape(rows, width, -1).any(-1)
    columns = torch.arange(1, width + 1, device=labels.device)
    return (real * columns).amax(1).to(torch.int64)


def _columns(batch: Mapping[str, Any]) -> int:
    first = batch.get("labels")
    if not (isinstance(first, torch.Tensor) and first.dim() >= 2):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 2),
                     None)
    if first is None:
        raise PackingError(
            f"the batch holds no [batch, time] tensor (keys: {sorted(map(str, batch))}); "
            "give a padded batch such as {'input_ids': ..., 'labels': ...}"
        )
    return int(first.shape[1])


def trim_padding(
    batch: Mapping[str, Any], length: int, *, ignore_index: int = IGNORE_INDEX
) -> dict[str, Any]:
    """Cut a padded batch to its first ``length`` columns.

    The batch's column count ``T`` is dimension 1 of ``batch["labels"]`` (or of its first tensor
    with at least two dimensions). Every tensor with at least two dimensions and ``T`` columns
    — ``input_ids``, ``labels``, an attention mask — is cut to ``[:, :length]`` (a view); every
    other value is passed through. For a causal model with padding at the end of each row,
    ``length = max real length`` gives the same loss and gradient with no padding computed.

    Args:
        batch: ``{"input_ids": [B, T], "labels": [B, T], ...}``.
        length: columns to keep, ``1 <= length <= T``.
        ignore_index: label value of padding; labels that are cut must all hold it.

    Returns:
        A new dict; ``batch`` is not modified.

    Raises:
        PackingError: ``length`` is not an integer in ``[1, T]``, the batch holds no 2-D tensor,
            or a label that would be cut is not ``ignore_index`` (the loss would change).
    """
    columns = _columns(batch)
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= columns:
        raise PackingError(
            f"length {length!r} is not an integer in [1, {columns}] (the batch's columns); give "
            "the longest real length, e.g. int(label_lengths(batch['labels']).max())"
        )
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == columns:
        need = int(label_lengths(labels, ignore_index).max()) if len(labels) else 0
        if need > length:
            raise PackingError(
                f"trimming to {length} columns would drop real labels (a row's last real label is "
                f"in column {need}); give length >= {need}"
            )
    return _cut(batch, length, columns)


def _cut(batch: Mapping[str, Any], length: int, columns: int) -> dict[str, Any]:
    return {
        k: v[:, :length]
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == columns
        else v
        for k, v in batch.items()
    }


PACK_MODES = ("partition", "tokens", "rows")


def pack_batch(
    batch: Mapping[str, Any], max_tokens: int, *, mode: str = "partition", cost: Any = None,
    ignore_index: int = IGNORE_INDEX,
) -> list[dict[str, Any]]:
    """Regroup one padded global batch into micro-batches of at most ``max_tokens`` positions.

    ``mode`` says how (all give the update of the whole batch with a sum-and-count loss):

    * ``"partition"`` (the default): the groups of
      :func:`bigbatch.partition.partition_by_cost` under ``cost`` (a :class:`~bigbatch.CostModel`
      from :func:`~bigbatch.measure_cost`; None: its prior, :data:`bigbatch.partition.PRIOR`):
      the fastest predicted runs of the length order. With a measured cost model it ran
      1.04–1.08× the speed of sorting and cutting into equal row counts and 1.07–1.17× greedy
      ``"tokens"`` (``benchmarks/packing.py``, 2-core CPU);
    * ``"tokens"``: the groups of :func:`pack_by_tokens` (greedy: fewest micro-batches);
    * ``"rows"``: padding-free rows, several samples per row
      (:func:`bigbatch.rows.pack_rows`, with pre-shifted labels); the model must take
      ``position_ids`` and keep attention within each sample.

    In the first two each micro-batch holds its group's rows (of every tensor: all must have one
    row per sample, see :mod:`bigbatch.batching`) cut by :func:`trim_padding` to the group's
    longest real length (at least 1); the rows' lengths are :func:`label_lengths` of
    ``batch["labels"]``.

    Args:
        batch: ``{"input_ids": [B, T], "labels": [B, T], ...}``, padding at the end of each row.
        max_tokens: padded token positions per micro-batch (rows × columns).
        mode: ``"partition"``, ``"tokens"`` or ``"rows"``.
        cost: the cost model, for ``mode="partition"`` only (None: the prior).
        ignore_index: label value of padding.

    Returns:
        The micro-batches, longest samples first (new tensors; ``batch`` is not modified).

    Raises:
        PackingError: an unknown ``mode``, or ``cost`` given for another mode than
            ``"partition"``; the batch has no ``"labels"`` tensor of at least 2 dimensions; or as
            in :func:`pack_by_tokens`.
        BatchPlanError: a tensor's rows differ from the labels', or a value is not a tensor.
    """
    if mode not in PACK_MODES:
        raise PackingError(f"mode {mode!r} is not one of {', '.join(PACK_MODES)}")
    if cost is not None and mode != "partition":
        raise PackingError(f"cost is used by mode='partition' only, not {mode!r}; drop it")
    if mode == "rows":
        from .rows import pack_rows

        return pack_rows(batch, max_tokens, ignore_index=ignore_index)  # type: ignore[return-value]
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        raise PackingError(
            f"the batch has no 'labels' tensor of shape [batch, time] (keys: "
            f"{sorted(map(str, batch))}); give a padded batch with labels, or use pack_by_tokens"
        )
    batch_rows(batch)  # every tensor holds one row per sample (BatchPlanError names any other)
    lengths = label_lengths(labels, ignore_index).cpu()
    if mode == "partition":
        from .partition import partition_by_cost

        groups = partition_by_cost(lengths, max_tokens, cost)
    else:
        groups = pack_by_tokens(lengths, max_tokens)
    out = []
    for group in groups:
        width = max(int(lengths[group].max()), 1)
        out.append(trim_padding(take_rows(dict(batch), group), width, ignore_index=ignore_index))
    return out


def pad_micro_batches(
    micro_batches: Sequence[Mapping[str, Any]], n: int, *, ignore_index: int = IGNORE_INDEX
) -> list[dict[str, Any]]:
    """Append empty micro-batches until there are ``n``: for data-parallel ranks.

    Packing gives each rank as many micro-batches as its own samples need, but under DDP/FSDP2
    every rank must run the same number per cycle (:meth:`~bigbatch.Accumulator.step` checks
    this). A rank with fewer appends micro-batches of one row and one column whose label is
    ``ignore_index``: its forward runs and its backward takes part in the gradient sync, but it
    adds 0 to the loss sum, 0 to the count and exactly 0 to the gradient, so the update is
    unchanged. Agree on ``n`` first, e.g. ``n = max`` over ranks of ``len(micro_batches)``
    (``torch.distributed.all_reduce`` with ``ReduceOp.MAX``).

    Args:
        micro_batches: one rank's micro-batches, at least one, as from :func:`pack_batch` or
            the command's own packer.
        n: the number wanted, ``>= len(micro_batches)``.
        ignore_index: label value of padding.

    Returns:
        A new list: the micro-batches given, then ``n - len(micro_batches)`` empty ones (each
        built from the first micro-batch's first row and column).

    Raises:
        PackingError: ``micro_batches`` is empty or holds no ``"labels"`` tensor, or ``n`` is
            smaller than its length.
    """
    out = [dict(m) for m in micro_batches]
    if isinstance(n, bool) or not isinstance(n, int) or n < len(out):
        raise PackingError(
            f"n {n!r} is not an integer >= {len(out)} (the micro-batches given); give the "
            "largest count over the ranks"
        )
    if len(out) == n:
        return out
    first = out[0] if out else {}
    labels = first.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2 or not len(labels):
        raise PackingError(
            "pad_micro_batches needs at least one micro-batch with a [batch, time] 'labels' "
            "tensor to copy the layout from; give the rank at least one sample"
        )
    row = take_rows(first, torch.zeros(1, dtype=torch.int64))
    empty = _cut(row, 1, _columns(first))
    empty["labels"] = torch.full_like(empty["labels"], ignore_index)
    return out + [dict(empty) for _ in range(n - len(out))]
