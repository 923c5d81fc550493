"""A fingerprint of the data a run reads, so that ``--resume`` can refuse data that changed.

A run's ``fingerprint.json`` holds, for ``--data`` and ``--eval-data``, the path and every file
the loaders read there (a file itself; in a folder, the files with a text suffix that are not
hidden) with its size and a BLAKE2b hash of its bytes. Sizes and modification times alone miss an
edit that keeps the size, and a copy changes the time without changing anything. Hashing costs
one more read of the data (about 12 MB of standard library in well under a second).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, flag
from .data.corpus import _STDLIB_BUILD_PREFIXES, TEXT_SUFFIXES, _skip_stdlib_dir, stdlib_root

__all__ = ["FINGERPRINT_FILE", "check_fingerprint", "data_fingerprint", "fingerprint_changes"]

FINGERPRINT_FILE = "fingerprint.json"
_BUILTIN = "built-in corpus"  # no --data: the running Python's standard library


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path, builtin: bool) -> dict[str, Path]:
    """The files under ``root`` the loaders read, by their name relative to it (POSIX form)."""
    if root.is_file():
        return {root.name: root}
    found: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root):
        if builtin:  # as bigbatch.app.data.corpus walks it: sources only, tests left out
            dirs[:] = [d for d in dirs if not _skip_stdlib_dir(d)]
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            file = Path(folder, name)
            suffixes = {".py"} if builtin else TEXT_SUFFIXES
            if builtin and name.startswith(_STDLIB_BUILD_PREFIXES):
                continue
            if not name.startswith(".") and file.suffix.lower() in suffixes and file.is_file():
                found[file.relative_to(root).as_posix()] = file
    return found


def _one(path: str | None) -> dict[str, Any] | None:
    """``{"path", "files": {name: [size, hash]}}`` for one data path (None: it does not exist,
    which the loader reports in its own words)."""
    root = stdlib_root() if path is None else Path(path)
    if not root.exists():
        return None
    files = _files(root, path is None)
    return {"path": _BUILTIN if path is None else str(root.absolute()),
            "files": {name: [file.stat().st_size, _file_hash(file)]
                      for name, file in sorted(files.items())}}


def data_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The fingerprint of the data ``config`` trains and evaluates on: ``{"data": …}`` and, with
    ``--eval-data``, ``{"eval_data": …}``."""
    found = {"data": _one(config.data.data)}
    if config.data.eval_data is not None:
        found["eval_data"] = _one(config.data.eval_data)
    return {key: value for key, value in found.items() if value is not None}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per file: ``--data PATH (changed)``,
    ``(new)`` or ``(gone)``."""
    changes = []
    for key, then in saved.items():
        current = now.get(key)
        if not isinstance(then, dict) or current is None:
            continue  # the loader reports a missing path in its own words
        old, new = then.get("files", {}), current["files"]
        single = Path(then["path"]).name in old and len(old) == 1  # the path is the file
        for name in sorted(set(old) | set(new)):
            what = ("changed" if name in old and name in new else "gone" if name in old
                    else "new")
            if what == "changed" and list(old[name]) == list(new[name]):
                continue
            where = (then["path"] if single and name in old else
                     f"{_BUILTIN} {name}" if then["path"] == _BUILTIN else
                     str(Path(then["path"]) / name))
            changes.append(f"{flag(key)} {where} ({what})")
    return changes


def check_fingerprint(out: Path, config: TrainConfig) -> None:
    """Refuse to resume the run in ``out`` on data other than it started with. A run folder
    without a fingerprint (written by an older bigbatch) is not checked.

    Raises:
        ConfigError: a file the run reads changed, appeared or disappeared.
    """
    path = out / FINGERPRINT_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # unreadable: as an old run folder (the checkpoints still verify themselves)
    if not isinstance(saved, dict):
        return
    changes = fingerprint_changes(saved, data_fingerprint(config))
    if changes:
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise ConfigError(
            f"--resume {out}: the data changed since the run started: "
            f"{', '.join(changes[:3])}{more}; --resume needs the same data: put it back, or "
            "start a new run (without --resume) on the new data")
