"""The training and validation samples of a run, from ``--data`` (and ``--eval-data``).

Plain text — text files, a folder of them, or JSONL records with only a ``text`` field — is cut
into windows of ``--seq-len`` tokens (:class:`TokenWindows`); records with prompts, completions or
chats, and the records of the classify and contrastive tasks, become one sample each
(:mod:`.records`). Without ``--eval-data`` the validation set is the documents or records whose
name (``file`` or ``file:line``) hashes below 5%, so it does not depend on file order.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .corpus import DataError, load_documents, split_documents
from .records import build_samples, class_labels, is_structured, load_records
from .tokenize import ByteTokenizer, Tokenizer
from .windows import TokenWindows

__all__ = ["Loaded", "RowSamples", "load_samples", "split_rows"]

T = TypeVar("T")
VAL_FRACTION = 0.05


@dataclass
class Loaded:
    """What :func:`load_samples` found: the two sample sets, the classes (classify) and notes."""

    train: Any
    val: Any
    labels: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _split_named(items: list[tuple[str, T]]) -> tuple[list[tuple[str, T]], list[tuple[str, T]]]:
    """By a hash of each name (both sides non-empty); see :func:`split_documents`."""
    if len(items) < 2:
        raise DataError(f"{len(items)} record(s) cannot be split into training and validation; "
                        "give more records or --eval-data")
    return split_documents(items, VAL_FRACTION)  # type: ignore[arg-type]


def _records_path(path: str | None) -> bool:
    """Whether ``--data`` is JSONL records (a .jsonl file, or a folder holding .jsonl files)."""
    if path is None:
        return False
    p = Path(path)
    return (p.is_file() and p.suffix.lower() == ".jsonl") or (
        p.is_dir() and any(p.rglob("*.jsonl")))


def _windows(docs: Sequence[tuple[str, bytes]], tok: Tokenizer, seq_len: int) -> TokenWindows:
    if isinstance(tok, ByteTokenizer):
        return TokenWindows(docs, seq_len)  # the built-in GPT: the bytes themselves
    tokens = [(name, torch.tensor(tok.text(data.decode("utf-8", errors="replace"))[0]))
              for name, data in docs]
    return TokenWindows(tokens, seq_len)


def load_samples(data: str | None, eval_data: str | None, *, task: str, tok: Tokenizer,
                 seq_len: int, policy: str) -> Loaded:
    """Load ``data`` (and ``eval_data``) as samples for ``task``, tokenized by ``tok``.

    Raises:
        DataError: the data is missing, malformed, or (with ``policy="stop"``) holds a bad sample;
            classify/contrastive data that is not JSONL records.
    """
    structured = task != "causal-lm"
    if structured and not _records_path(data):
        raise DataError(f"--task {task} learns from JSONL records ("
                        + ("text/label" if task == "classify" else "query/document")
                        + " fields); give --data FILE.jsonl")
    records = load_records(data) if _records_path(data) else None
    if records is not None and (structured or is_structured(records)):
        if eval_data is not None:
            train_records, val_records = records, load_records(eval_data)
        else:
            train_records, val_records = _split_named(records)
        labels = class_labels(train_records) if task == "classify" else {}
        if task == "classify" and not labels:
            raise DataError("--task classify: the training records have no 'text' string and "
                            "'label' (int or string); see docs/task-classify.md")
        if task == "classify" and len(labels) < 2:
            raise DataError(f"--task classify needs at least 2 labels in the training records, "
                            f"found {len(labels)}")
        train, bad = build_samples(train_records, task, tok, seq_len, policy=policy,
                                   labels=labels)
        val, bad_val = build_samples(val_records, task, tok, seq_len, policy=policy,
                                     labels=labels)
        notes = [n for n in (bad.report(len(train_records), "training data"),
                             bad_val.report(len(val_records), "validation data")) if n]
        return Loaded(train, val, labels, notes)
    docs = load_documents(data)
    if eval_data is not None:
        train_docs, val_docs = docs, load_documents(eval_data)
    else:
        train_docs, val_docs = split_documents(docs)
    return Loaded(_windows(train_docs, tok, seq_len), _windows(val_docs, tok, seq_len))


class RowSamples:
    """The rows of a user's batch (``--model module:function``) as samples."""

    def __init__(self, rows: Any, index: torch.Tensor) -> None:
        self.rows, self.index = rows, index

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> Any:
        from ...batching import take_rows

        return take_rows(self.rows, self.index[torch.as_tensor(indices, dtype=torch.int64)])


def split_rows(rows: Any) -> tuple[RowSamples, RowSamples]:
    """Training and validation rows of a user's batch: row i validates when
    ``crc32("row:i") % 1000 < 50`` (at least one row each side).

    Raises:
        DataError: fewer than 2 rows.
    """
    from ...batching import batch_rows

    n = batch_rows(rows) or 0
    if n < 2:
        raise DataError(f"the factory's batch has {n} row(s); give at least 2 (one to validate)")
    keys = [zlib.crc32(f"row:{i}".encode()) % 1000 for i in range(n)]
    val = [k < VAL_FRACTION * 1000 for k in keys]
    if not any(val):
        val[min(range(n), key=keys.__getitem__)] = True
    if all(val):
        val[max(range(n), key=keys.__getitem__)] = False
    train_idx = torch.tensor([i for i in range(n) if not val[i]], dtype=torch.int64)
    val_idx = torch.tensor([i for i in range(n) if val[i]], dtype=torch.int64)
    return RowSamples(rows, train_idx), RowSamples(rows, val_idx)
