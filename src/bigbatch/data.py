"""Byte-level text data: the built-in corpus, a deterministic split, windows and batch order.

With no data of its own, ``bigbatch train`` learns from the Python standard library's own ``.py``
sources (test folders and installed packages left out), so it runs anywhere Python does, offline.

The batch order is the heart of exactness: :func:`global_batches` yields the sample indices of each
optimizer step from ``(num_samples, global_batch, seed)`` alone. However a global batch is later cut
into micro-batches or spread over processes, the same samples are trained on at the same step.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .errors import BigBatchError

__all__ = [
    "DataError",
    "Document",
    "TokenWindows",
    "eval_batches",
    "global_batches",
    "load_documents",
    "split_definitions",
    "split_documents",
    "stdlib_definitions",
    "stdlib_root",
]

Document = tuple[str, bytes]
"""A named text, as ``(name, utf-8 bytes)``; names are relative so they agree across machines."""

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".text", ".jsonl"})
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
)
# Generated at build time and holding the install's own paths: they would make the corpus differ
# between two installs of the same Python version, so they are left out too.
_STDLIB_BUILD_PREFIXES = ("config-", "_sysconfigdata_")
_DATA_HINT = "give a text file, a folder of text files, or a .jsonl file with a 'text' field"
IGNORE_INDEX = -100


class DataError(BigBatchError):
    """The data given cannot be used; the one-line message names the problem and the fix.

    A :class:`ValueError` (through :class:`~bigbatch.BigBatchError`).
    """


def stdlib_root() -> Path:
    """Return the folder holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_stdlib_dir(name: str) -> bool:
    return (
        name in _STDLIB_SKIP_DIRS
        or name.startswith("test_")
        or name.startswith(_STDLIB_BUILD_PREFIXES)
    )


def _stdlib_documents() -> list[Document]:
    root = stdlib_root()
    found: list[tuple[str, Path]] = []
    # os.walk with in-place pruning never descends into site-packages, which can be huge.
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _skip_stdlib_dir(d)]
        for name in files:
            path = Path(folder, name)
            skip = not name.endswith(".py") or name.startswith(_STDLIB_BUILD_PREFIXES)
            if not skip and path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    docs = [(rel, _read_bytes(path)) for rel, path in found]
    docs = [d for d in docs if d[1]]
    if not docs:
        raise DataError(
            f"the standard library at {root} holds no .py sources (zipped or stripped install); "
            f"pass --data with a text file, a folder of text files, or a .jsonl file"
        )
    return docs


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DataError(
            f"{path}: cannot read ({reason}); check its permissions or leave it out"
        ) from exc


def _jsonl_documents(path: Path, name: str) -> list[Document]:
    docs: list[Document] = []
    raw = _read_bytes(path)
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for non-UTF-8 bytes
            # JSONDecodeError's own text says "line 1"; only its column means anything here.
            reason = (
                f"{exc.msg} at column {exc.colno}"
                if isinstance(exc, json.JSONDecodeError)
                else "not UTF-8"
            )
            raise DataError(
                f"{path}: line {lineno} is not valid JSON ({reason}); "
                f'write one JSON object per line, like {{"text": "..."}}'
            ) from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(
                f"{path}: line {lineno} has no 'text' string field; "
                f'give every line a "text" field holding a string'
            )
        # JSON may escape lone surrogates ("\\ud800"), which UTF-8 cannot encode; one bad character
        # should not cost the whole corpus, so it becomes "?".
        docs.append((f"{name}:{lineno}", text.encode("utf-8", errors="replace")))
    return docs


def _file_documents(path: Path, name: str) -> list[Document]:
    if path.suffix.lower() == ".jsonl":
        return _jsonl_documents(path, name)
    return [(name, _read_bytes(path))]


def load_documents(path: str | os.PathLike[str] | None) -> list[Document]:
    """Load the documents to train on.

    Args:
        path: ``None`` for the standard library's ``.py`` files (test folders, ``__pycache__``,
            ``site-packages`` and ``dist-packages`` left out); a ``.jsonl`` file (one document per
            non-blank line, from its ``"text"`` field, named ``file.jsonl:LINENO``); any other
            file (one document, its raw bytes); or a folder, searched recursively for files with
            a suffix in :data:`TEXT_SUFFIXES` (hidden files and folders skipped).

    Returns:
        ``(name, bytes)`` pairs sorted by name, empty documents dropped. Names are relative
        (to the folder, or the file's own name) in POSIX form, so they agree across machines.

    Raises:
        DataError: the path is missing or unreadable, a JSONL line is malformed, or no text is
            found.
    """
    if path is None:
        return _stdlib_documents()
    root = Path(path)
    if root.is_dir():
        docs: list[Document] = []
        files: list[tuple[str, Path]] = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                file = Path(folder, name)
                if (
                    name.startswith(".")
                    or file.suffix.lower() not in TEXT_SUFFIXES
                    or not file.is_file()
                ):
                    continue
                files.append((file.relative_to(root).as_posix(), file))
        files.sort(key=lambda item: item[0])
        for rel, file in files:
            docs.extend(_file_documents(file, rel))
        if not files:
            suffixes = " ".join(sorted(TEXT_SUFFIXES))
            raise DataError(
                f"--data {root}: holds no text (no file ending in {suffixes}); {_DATA_HINT}"
            )
    elif root.is_file():
        docs = _file_documents(root, root.name)
    elif root.exists():
        raise DataError(f"--data {root}: not a regular file or folder; {_DATA_HINT}")
    else:
        raise DataError(f"--data {root}: no such file or folder; {_DATA_HINT}")
    docs = [d for d in docs if d[1]]
    if not docs:
        raise DataError(f"--data {root}: holds no text (only empty documents); {_DATA_HINT}")
    return docs


def _name_hash(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Split documents into training and validation sets, by name alone.

    A document goes to validation when ``crc32(name) % 1000 < val_fraction * 1000``, so the
    split does not depend on file order or on which other documents exist. With two or more
    documents both sides are kept non-empty: if validation would be empty, the document with the
    smallest ``(crc32(name) % 1000, name)`` moves there; if training would be empty, the one with
    the largest moves back. A single document is cut by bytes instead: its last
    ``max(2, round(len * val_fraction))`` bytes (one window of at least two bytes) become the
    validation document, the rest the training one; both keep the original name.

    Args:
        docs: documents as returned by :func:`load_documents`.
        val_fraction: target share of documents held out, in ``(0, 1)``.

    Returns:
        ``(train, validation)``, each in the input order.

    Raises:
        ValueError: ``val_fraction`` is not in ``(0, 1)``.
        DataError: there are no documents, or a lone document is shorter than 4 bytes.
    """
    if isinstance(val_fraction, bool) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction!r} is outside (0, 1); give e.g. 0.05")
    docs = list(docs)
    if not docs:
        raise DataError(f"no documents to split; {_DATA_HINT}")
    if len(docs) == 1:
        name, data = docs[0]
        n_val = max(2, round(len(data) * val_fraction))
        if len(data) - n_val < 2:
            raise DataError(
                f"document {name!r} has {len(data)} bytes, too few to hold out validation text; "
                f"give at least 4 bytes, or more than one document"
            )
        return [(name, data[:-n_val])], [(name, data[-n_val:])]
    keys = [(_name_hash(name) % 1000, name) for name, _ in docs]
    is_val = [key[0] < val_fraction * 1000 for key in keys]
    if not any(is_val):
        is_val[min(range(len(docs)), key=keys.__getitem__)] = True
    elif all(is_val):
        is_val[max(range(len(docs)), key=keys.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    return train, val


class TokenWindows:
    """Fixed-length next-byte samples cut from documents.

    Each document is cut into consecutive, non-overlapping chunks of ``seq_len + 1`` bytes; a
    document's last, shorter chunk is kept when it has at least 2 bytes and is padded. A chunk
    ``c`` of length ``L`` gives ``input_ids[:L-1] = c[:-1]`` and ``labels[:L-1] = c[1:]``; later
    positions hold input 0 and label ``-100`` (ignored by the loss). So samples carry different
    numbers of real tokens, which is why losses are normalized by token count.

    All bytes live in one flat ``uint8`` tensor, with each chunk's start and length alongside.

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


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} {value!r} must be an integer >= {minimum}")


def _epoch_seed(seed: int, index: int, purpose: str = "") -> int:
    # A fresh generator per (seed, index) lets any step's draw be computed directly. Hashing the
    # pair (rather than e.g. seed * K + index) keeps different seeds from ever sharing a draw.
    tag = f"bigbatch:{seed}:{index}" + (f":{purpose}" if purpose else "")
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little") >> 1


def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def global_batches(
    num_samples: int, global_batch: int, seed: int, *, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Yield, forever, the sample indices of each optimizer step.

    Epoch ``e`` is a permutation of ``range(num_samples)`` drawn from a generator keyed on
    ``(seed, e)``; step ``s`` takes items ``s * global_batch`` to ``(s + 1) * global_batch`` of the
    epochs laid end to end, so a batch may straddle two epochs (or more, when ``global_batch >
    num_samples``). The sequence depends on the three positional arguments only (and on torch's
    ``randperm``, identical for a given torch version).

    Args:
        num_samples: size of the dataset.
        global_batch: samples per optimizer step, before any split into micro-batches.
        seed: any integer.
        start_step: first step to yield; reached directly, in time independent of its value, so a
            resumed run sees exactly the batches an uninterrupted one would.

    Returns:
        An infinite iterator of 1-D ``LongTensor`` of length ``global_batch``.

    Raises:
        ValueError: an argument is out of range (raised at the call, not on first ``next``).
    """
    _check_int("num_samples", num_samples, minimum=1)
    _check_int("global_batch", global_batch, minimum=1)
    _check_int("start_step", start_step, minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed {seed!r} must be an integer")
    return _global_batches(num_samples, global_batch, seed, start_step)


def _global_batches(
    num_samples: int, global_batch: int, seed: int, start_step: int, start: int | None = None
) -> Iterator[torch.Tensor]:
    first = start_step * global_batch if start is None else start
    epoch, offset = divmod(first, num_samples)
    perm = _epoch_permutation(num_samples, seed, epoch)
    while True:
        parts = []
        need = global_batch
        while need:
            take = min(need, num_samples - offset)
            parts.append(perm[offset : offset + take])
            offset += take
            need -= take
            if offset == num_samples:
                epoch, offset = epoch + 1, 0
                perm = _epoch_permutation(num_samples, seed, epoch)
        # cat copies even a single part: a batch owns its memory rather than viewing the epoch.
        yield torch.cat(parts)


def take_samples(num_samples: int, seed: int, start: int, n: int) -> torch.Tensor:
    """Items ``start`` to ``start + n`` of the epochs laid end to end (see :func:`global_batches`).

    For a global batch that changes from step to step (``--accum-schedule``): step s takes the
    ``n_s`` items after those its predecessors took. With a constant global batch g this is
    exactly ``global_batches``' step ``start // g``.
    """
    _check_int("num_samples", num_samples, minimum=1)
    _check_int("start", start, minimum=0)
    _check_int("n", n, minimum=1)
    return next(_global_batches(num_samples, n, seed, 0, start=start))


def eval_batches(num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``0..num_samples-1`` in order, in batches of ``batch_size`` (the last may be shorter).

    Args:
        num_samples: size of the dataset (0 yields nothing).
        batch_size: samples per batch.

    Returns:
        A finite iterator of 1-D ``LongTensor``.

    Raises:
        ValueError: ``num_samples`` is negative or ``batch_size`` is not positive.
    """
    _check_int("num_samples", num_samples, minimum=0)
    _check_int("batch_size", batch_size, minimum=1)
    return (
        torch.arange(start, min(start + batch_size, num_samples))
        for start in range(0, num_samples, batch_size)
    )


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


_DEFINITION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def split_definitions(docs: Sequence[Document]) -> list[Document]:
    """Cut Python sources into one document per top-level function or class.

    Each document is parsed with :func:`ast.parse`; every ``def``, ``async def`` and ``class`` in
    the module body becomes one document: its source lines, from its first decorator to its last
    line, byte for byte (nested definitions stay inside their parent). Code between definitions
    (imports, constants, ``if __name__ == ...``) is left out. A document that does not parse
    (not Python, a syntax of another Python version, a null byte) is skipped, and so are
    definitions whose source is empty.

    Lengths vary a lot — one-line helpers next to classes of thousands of lines — which makes
    this a natural variable-length corpus.

    Args:
        docs: ``(name, bytes)`` documents, e.g. from :func:`load_documents`.

    Returns:
        ``(name, bytes)`` pairs named ``"<document name>:<definition name>"`` (for example
        ``"json/encoder.py:JSONEncoder"``), in document order and, within a document, in source
        order. A name defined twice at the top level of one file gives two documents of the
        same name.
    """
    out: list[Document] = []
    for name, data in docs:
        try:
            with warnings.catch_warnings():  # e.g. invalid escape sequences in old sources
                warnings.simplefilter("ignore")
                tree = ast.parse(data, filename=name)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        # bytes.splitlines breaks at \n, \r and \r\n only: the line ends the parser counts.
        lines = data.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, _DEFINITION_NODES) or node.end_lineno is None:
                continue
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            source = b"".join(lines[first - 1 : node.end_lineno])
            if source:
                out.append((f"{name}:{node.name}", source))
    return out


def stdlib_definitions() -> list[Document]:
    """One document per top-level function or class of the standard library's sources.

    :func:`split_definitions` applied to :func:`load_documents` ``(None)`` (the same ``.py``
    files ``bigbatch train`` learns from by default); deterministic for a given Python
    installation. Parsing the whole library takes a few seconds.

    Returns:
        ``(name, bytes)`` pairs such as ``"json/encoder.py:JSONEncoder"``.

    Raises:
        DataError: the standard library holds no ``.py`` sources, or none of them holds a
            top-level definition.
    """
    docs = split_definitions(load_documents(None))
    if not docs:
        raise DataError(
            f"the standard library at {stdlib_root()} holds no top-level function or class "
            "(stripped install); use load_documents() on sources that have some"
        )
    return docs
