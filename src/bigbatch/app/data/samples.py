"""Tokenized samples of different lengths, batched with padding on the right.

Each class holds its samples in flat tensors and gives a padded batch of any rows, padded to the
longest of them (dynamic padding): :class:`SupervisedSamples` for a causal language model with
some positions masked (prompts, user turns), :class:`LabeledSamples` for sequence classification,
:class:`PairSamples` for query/document pairs. Padding changes no real position's output in a
causal model and is masked out of attention otherwise; its labels are ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...loss import IGNORE_INDEX

__all__ = ["LabeledSamples", "PairSamples", "SupervisedSamples"]

Index = torch.Tensor | Sequence[int]


class _Ragged:
    """Sequences of different lengths in one flat tensor (and their starts and lengths)."""

    def __init__(self, seqs: Sequence[Sequence[int]], dtype: torch.dtype = torch.int64) -> None:
        self.lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.flat = torch.tensor([v for s in seqs for v in s], dtype=dtype)

    def padded(self, idx: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T]`` values padded with ``pad`` (T the longest, at least 1) and the mask of real
        positions."""
        lengths = self.lengths[idx]
        width = max(int(lengths.max()) if len(idx) else 0, 1)
        cols = torch.arange(width)
        real = cols[None, :] < lengths[:, None]
        pos = (self.starts[idx, None] + cols).clamp_(max=max(len(self.flat) - 1, 0))
        values = self.flat[pos] if len(self.flat) else torch.zeros(pos.shape, dtype=self.flat.dtype)
        return torch.where(real, values, torch.full_like(values, pad)), real


def _index(idx: Index, n: int) -> torch.Tensor:
    out = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
    if len(out) and (int(out.min()) < 0 or int(out.max()) >= n):
        raise IndexError(f"sample index out of range [0, {n}): got min {int(out.min())}, "
                         f"max {int(out.max())}")
    return out


class SupervisedSamples:
    """Next-token samples whose labels are masked where no loss is wanted.

    Sample ``i`` with tokens ``s`` (length L) and per-token ``trained`` flags gives
    ``input_ids = s[:-1]`` and ``labels[t] = s[t+1]`` when ``trained[t+1]``, else
    ``IGNORE_INDEX``: labels are pre-shifted, as :class:`~bigbatch.app.data.TokenWindows`'s.

    Args:
        tokens: each sample's token ids (at least 2).
        trained: for each, one flag per token: predicting it carries loss.
        pad_id: the input id of padding.
    """

    def __init__(self, tokens: Sequence[Sequence[int]], trained: Sequence[Sequence[bool]],
                 pad_id: int) -> None:
        self._inputs = _Ragged([s[:-1] for s in tokens])
        self._labels = _Ragged([[v if f else IGNORE_INDEX for v, f in zip(s[1:], t[1:])]
                                for s, t in zip(tokens, trained)])
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self._inputs.lengths)

    def batch(self, indices: Index) -> dict[str, torch.Tensor]:
        """``{"input_ids", "labels", "attention_mask"}``, ``[B, T]`` with T the longest sample."""
        idx = _index(indices, len(self))
        ids, real = self._inputs.padded(idx, self.pad_id)
        labels, _ = self._labels.padded(idx, IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels, "attention_mask": real.long()}

    def lengths(self, indices: Index) -> torch.Tensor:
        """Columns each sample needs: one past its last trained label (what packing trims to)."""
        idx = _index(indices, len(self))
        labels, _ = self._labels.padded(idx, IGNORE_INDEX)
        cols = torch.arange(1, labels.shape[1] + 1)
        return ((labels != IGNORE_INDEX) * cols).amax(1)

    def tokens_in(self, indices: Index) -> int:
        """Trained labels (the loss's count) in these samples."""
        idx = _index(indices, len(self))
        labels, _ = self._labels.padded(idx, IGNORE_INDEX)
        return int((labels != IGNORE_INDEX).sum())


class LabeledSamples:
    """Token sequences with one class label each (sequence classification)."""

    def __init__(self, tokens: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int
                 ) -> None:
        self._tokens = _Ragged(tokens)
        self._labels = torch.tensor(list(labels), dtype=torch.int64)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self._labels)

    def batch(self, indices: Index) -> dict[str, torch.Tensor]:
        """``{"input_ids": [B, T], "attention_mask": [B, T], "label": [B]}``."""
        idx = _index(indices, len(self))
        ids, real = self._tokens.padded(idx, self.pad_id)
        return {"input_ids": ids, "attention_mask": real.long(), "label": self._labels[idx]}


class PairSamples:
    """Query/document pairs: row i's document is the positive for row i's query."""

    def __init__(self, queries: Sequence[Sequence[int]], documents: Sequence[Sequence[int]],
                 pad_id: int) -> None:
        self._q, self._d = _Ragged(queries), _Ragged(documents)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self._q.lengths)

    def batch(self, indices: Index) -> dict[str, dict[str, torch.Tensor]]:
        """``{"query": {"input_ids", "attention_mask"}, "document": {...}}``, each side padded
        to its own longest."""
        idx = _index(indices, len(self))
        out = {}
        for side, seqs in (("query", self._q), ("document", self._d)):
            ids, real = seqs.padded(idx, self.pad_id)
            out[side] = {"input_ids": ids, "attention_mask": real.long()}
        return out
