"""Fixed-length byte windows cut from documents, padded; and variable-length cuts of a batch.

Samples carry different numbers of real tokens (a document's last window is short and padded),
which is why losses are normalized by token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...loss import IGNORE_INDEX
from .corpus import DataError, Document
from .order import check_int as _check_int
from .order import epoch_seed as _epoch_seed

__all__ = ["TokenWindows", "vary_lengths"]


class TokenWindows:
    """Fixed-length next-token samples cut from documents (bytes, or token ids as 1-D tensors).

    Each document is cut into consecutive, non-overlapping chunks of ``seq_len + 1`` bytes; a
    document's last, shorter chunk is kept when it has at least 2 bytes and is padded. A chunk
    ``c`` of length ``L`` gives ``input_ids[:L-1] = c[:-1]`` and ``labels[:L-1] = c[1:]``; later
    positions hold input 0 and label ``-100`` (ignored by the loss). So samples carry different
    numbers of real tokens, which is why losses are normalized by token count.

    All bytes (or ids) live in one flat tensor, with each chunk's start and length alongside.

    Args:
        docs: documents as returned by :func:`load_documents` / :func:`split_documents`.
        seq_len: tokens per sample (the model's context length).

    Raises:
        ValueError: ``seq_len`` is not a positive integer.
        DataError: the documents give no sample (every one shorter than 2 bytes).
    """

    def __init__(self, docs: Sequence[Document], seq_len: int) -> None:
        _check_int("seq_len", seq_len, minimum=1)
        self.seq_len = seq_len
        chunk = seq_len + 1
        lengths = torch.tensor([len(data) for _, data in docs], dtype=torch.int64)
        self.num_documents = len(lengths)
        if any(isinstance(data, torch.Tensor) for _, data in docs):  # token ids, not bytes
            self._data = torch.cat([torch.as_tensor(data, dtype=torch.int32).reshape(-1)
                                    for _, data in docs]) if docs else torch.empty(0)
        else:
            # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
            buffer = bytearray(b"".join(data for _, data in docs))
            self._data = (
                torch.frombuffer(buffer, dtype=torch.uint8)
                if buffer
                else torch.empty(0, dtype=torch.uint8)
            )
        doc_starts = torch.cumsum(lengths, 0) - lengths
        per_doc = (lengths + chunk - 1) // chunk
        doc_of_chunk = torch.repeat_interleave(torch.arange(len(lengths)), per_doc)
        first_chunk = torch.cumsum(per_doc, 0) - per_doc
        k = torch.arange(len(doc_of_chunk)) - first_chunk[doc_of_chunk]
        starts = doc_starts[doc_of_chunk] + k * chunk
        sizes = torch.clamp(lengths[doc_of_chunk] - k * chunk, max=chunk)
        keep = sizes >= 2
        self._starts = starts[keep].contiguous()
        self._sizes = sizes[keep].contiguous()
        if len(self._starts) == 0:
            raise DataError(
                f"{len(lengths)} document(s) give no sample of at least 2 bytes; give more text"
            )

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return (
            f"TokenWindows(samples={len(self)}, seq_len={self.seq_len}, "
            f"documents={self.num_documents}, bytes={self.num_bytes})"
        )

    @property
    def num_bytes(self) -> int:
        """Bytes of text held, including any 1-byte document tails that form no sample."""
        return len(self._data)

    @property
    def num_tokens(self) -> int:
        """Labels that count towards the loss, over every sample."""
        return int((self._sizes - 1).sum())

    def _indices(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(
                f"sample index out of range [0, {len(self)}): got min {int(idx.min())}, "
                f"max {int(idx.max())}"
            )
        return idx

    def batch(self, indices: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Gather samples into a padded batch.

        Args:
            indices: sample indices in ``[0, len(self))``, a 1-D tensor or sequence of ints.

        Returns:
            ``{"input_ids": LongTensor[B, seq_len], "labels": LongTensor[B, seq_len]}`` with
            padded positions holding input 0 and label -100.

        Raises:
            IndexError: an index is out of range.
        """
        idx = self._indices(indices)
        offsets = torch.arange(self.seq_len + 1)
        # Clamp so padded positions of a chunk at the very end of the data stay in bounds; their
        # values are masked out below.
        pos = (self._starts[idx, None] + offsets).clamp_(max=max(len(self._data) - 1, 0))
        window = self._data[pos].long()
        real = offsets[None, : self.seq_len] < (self._sizes[idx, None] - 1)
        input_ids = torch.where(real, window[:, :-1], 0)
        labels = torch.where(real, window[:, 1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    def tokens_in(self, indices: torch.Tensor | Sequence[int]) -> int:
        """Number of labels that are not ignored in the batch of these samples.

        Raises:
            IndexError: an index is out of range.
        """
        return int((self._sizes[self._indices(indices)] - 1).sum())

    def lengths(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Real length of each of these samples: its labels that are not ignored.

        Sample ``i``'s real labels are its first ``lengths[i]`` columns (``1 <= lengths[i] <=
        seq_len``); every later column is padding (input 0, label -100). So
        ``batch(indices)`` cut to its first ``max(lengths)`` columns loses nothing, and
        ``lengths(indices).sum() == tokens_in(indices)``.

        Args:
            indices: sample indices in ``[0, len(self))``, a 1-D tensor or sequence of ints.

        Returns:
            ``LongTensor[len(indices)]``, in the order of ``indices``.

        Raises:
            IndexError: an index is out of range.
        """
        return self._sizes[self._indices(indices)] - 1



def vary_lengths(batch: dict[str, torch.Tensor], seed: int, step: int, min_len: int = 1,
                 ) -> dict[str, torch.Tensor]:
    """Cut each row's labels at a random length, making a padded, variable-length batch.

    Row ``i`` keeps its first ``L_i`` labels, ``L_i`` uniform in ``[min_len, seq_len]`` drawn from a
    generator keyed on ``(seed, step)`` (never the global RNG); later labels become
    ``IGNORE_INDEX``. Inputs are untouched: the model is causal, so inputs after position ``L_i``
    cannot change the predictions before it. Per-micro-batch token counts then differ a lot —
    where the naive mean-of-means recipe goes wrong.

    Args:
        batch: ``{"labels": LongTensor[B, seq_len], ...}``; other entries are passed through.
        seed: any integer (e.g. the run's seed).
        step: the optimizer step the batch is for; each step gets its own lengths.
        min_len: shortest kept prefix (capped at ``seq_len``).

    Returns:
        A new batch dict; ``batch`` is not modified.

    Raises:
        ValueError: ``min_len`` is not an integer >= 1.
    """
    labels = batch["labels"]
    rows, seq_len = labels.shape
    _check_int("min_len", min_len, minimum=1)
    gen = torch.Generator().manual_seed(_epoch_seed(seed, step, "lengths"))
    lengths = torch.randint(min(min_len, seq_len), seq_len + 1, (rows, 1), generator=gen)
    keep = torch.arange(seq_len).unsqueeze(0) < lengths.to(labels.device)
    return {**batch, "labels": torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))}


