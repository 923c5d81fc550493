"""Documents to learn from: the built-in corpus, the user's files, a deterministic split.

With no data of its own, ``bigbatch train`` learns from the Python standard library's own ``.py``
sources (test folders and installed packages left out), so it runs anywhere Python does, offline.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

from ...errors import BigBatchError

__all__ = [
    "DataError",
    "Document",
    "jsonl_records",
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


def jsonl_records(path: Path, name: str) -> list[tuple[str, object]]:
    """The JSON value of every non-blank line of a ``.jsonl`` file, named ``name:LINENO``.

    Raises:
        DataError: the file cannot be read, or a line is not valid JSON (its number said).
    """
    out: list[tuple[str, object]] = []
    for lineno, line in enumerate(_read_bytes(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{name}:{lineno}", json.loads(line)))
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
    return out


def _jsonl_documents(path: Path, name: str) -> list[Document]:
    docs: list[Document] = []
    for where, record in jsonl_records(path, name):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            lineno = where.rsplit(":", 1)[1]
            raise DataError(
                f"{path}: line {lineno} has no 'text' string field; "
                f'give every line a "text" field holding a string'
            )
        # JSON may escape lone surrogates ("\\ud800"), which UTF-8 cannot encode; one bad
        # character should not cost the whole corpus, so it becomes "?".
        docs.append((where, text.encode("utf-8", errors="replace")))
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
