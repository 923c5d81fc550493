"""Crash-safe checkpoints: tensors in safetensors, everything else in JSON, nothing pickled.

A checkpoint is a directory ``root/<name>/`` holding ``tensors.safetensors`` (every tensor, under
keys ``t0, t1, …``), ``state.json`` (the rest of the structure, tensors replaced by their keys) and,
written last, ``manifest.json`` (size and sha256 of the other two). Loading only parses data, so a
crafted file cannot run code.

Writing is atomic: the directory is built as ``root/.tmp-<name>-<pid>-<random>/``, every file and
the directory are fsynced, and only then is it renamed to ``root/<name>``. A process killed at any
moment (SIGKILL included) leaves a complete checkpoint or a ``.tmp-*`` that readers ignore and a
later :func:`save_checkpoint` with ``keep`` removes. Later damage (truncation, bit flips) fails the
checksums, and :func:`load_latest` falls back to an older checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import BigBatchError

__all__ = ["CheckpointError", "flatten_state", "list_checkpoints", "load_checkpoint",
           "load_latest", "save_checkpoint", "set_aside", "unflatten_state"]

TENSORS, STATE, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
_REQUIRED = (TENSORS, STATE)
_FORMAT, _VERSION = "bigbatch-checkpoint", 1
_TMP, _REJECTED = ".tmp-", ".rejected-"
# Temp directories this process is writing right now. A ``.tmp-*`` carrying our pid but not listed
# here was left by an earlier, killed process that had the same pid (containers reuse small pids).
_ACTIVE_TEMPS: set[str] = set()


class CheckpointError(BigBatchError):
    """A checkpoint cannot be written or read; the one-line message names it and what to do."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into its tensors and a JSON-serializable tree that refers to them.

    The tree keeps None, bool, int, str, finite floats and lists as themselves; every JSON object
    is a one-key tag: ``{"float": "nan"}``, ``{"tuple": [...]}``, ``{"tensor": "t3"}``,
    ``{"dict": [[key, value], ...]}`` (``"odict"`` for an OrderedDict; keys str or int, in order).

    Args:
        obj: dicts (str or int keys), lists, tuples, tensors, ints, floats, bools, None, str.

    Returns:
        ``(tensors, tree)``: each tensor a detached, contiguous CPU copy with its own storage
        (safetensors refuses views and shared storage), and the tree.

    Raises:
        CheckpointError: a value of another type (a function, a numpy array, a set, a subclass such
            as a namedtuple), named by its place, e.g. ``state['optimizer']['state'][0]['foo']``.
    """
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _flatten(obj, "state", tensors)


def _flatten(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    kind = type(obj)  # exact types: a subclass (IntEnum, namedtuple) would come back different
    if obj is None or kind in (bool, int, str):
        return obj
    if kind is float:
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        return {"tensor": key}
    if kind is list or kind is tuple:
        items = [_flatten(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
        return items if kind is list else {"tuple": items}
    if kind is dict or kind is OrderedDict:
        pairs = []
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise CheckpointError(
                    f"{where} has key {key!r} of type {type(key).__name__}: only str and int keys "
                    "can be saved; convert the key before saving")
            pairs.append([key, _flatten(value, f"{where}[{key!r}]", tensors)])
        return {"dict" if kind is dict else "odict": pairs}
    raise CheckpointError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which a checkpoint cannot hold: "
        "only dict, list, tuple, dense tensor, int, float, bool, str and None can be saved; "
        "convert it first (e.g. a numpy array with torch.from_numpy)")


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Rebuild the structure :func:`flatten_state` split, with the same types and tensors.

    Args:
        tensors: the tensors by key.
        tree: the tree from :func:`flatten_state` (or read back from JSON).

    Returns:
        The original structure: tuples as tuples, int keys as ints, floats as floats.

    Raises:
        CheckpointError: the tree is malformed or refers to a tensor that is not in ``tensors``.
    """
    return _unflatten(tree, tensors, "state")


def _unflatten(node: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if node is None or type(node) in (bool, int, float, str):
        return node
    if type(node) is list:
        return [_unflatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(node)]
    if type(node) is dict and len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "tensor" and type(value) is str and value in tensors:
            return tensors[value]
        if tag == "float" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == "tuple" and type(value) is list:
            return tuple(_unflatten(v, tensors, f"{where}[{i}]") for i, v in enumerate(value))
        if tag in ("dict", "odict") and type(value) is list and all(
                type(p) is list and len(p) == 2 and type(p[0]) in (str, int) for p in value):
            out: dict[Any, Any] = {} if tag == "dict" else OrderedDict()
            for key, item in value:
                out[key] = _unflatten(item, tensors, f"{where}[{key!r}]")
            return out
    raise CheckpointError(f"{where} is malformed or refers to a missing tensor ({node!r:.60}); "
                          "the state was not written by bigbatch or is damaged")


def save_checkpoint(root: Path, name: str, state: Any, *, keep: int | None = None,
                    protect: str | None = None) -> Path:
    """Write ``root/name/`` atomically; then, with ``keep``, prune old and stale directories.

    Args:
        root: directory holding the checkpoints (created if missing).
        name: a directory name that sorts chronologically, e.g. ``step-00000012-micro-0003``.
        state: the structure to save (see :func:`flatten_state`).
        keep: keep the newest ``keep`` checkpoints by name (and always the new one) and remove
            ``.tmp-*`` directories of dead writers; None keeps everything.
        protect: the name of one more checkpoint that pruning keeps (e.g. the newest one taken
            between optimizer steps, which any world size can resume from).

    Returns:
        The path of the new checkpoint.

    Raises:
        CheckpointError: a bad name or ``keep``, ``root/name`` already exists (never overwritten),
            an unsupported value in ``state``, or a write failed (older checkpoints are untouched).
    """
    root = Path(root)
    final = root / name
    if not name or name != Path(name).name or name.startswith("."):
        raise CheckpointError(f"checkpoint {final}: name {name!r} must be a single path component "
                              "not starting with '.', e.g. 'step-00000012-micro-0003'")
    if keep is not None and keep < 1:
        raise CheckpointError(f"checkpoint {final}: keep={keep} must be at least 1 (the new "
                              "checkpoint is always kept); pass keep=None to keep all")
    if os.path.lexists(final):
        raise CheckpointError(f"checkpoint {final}: already exists and is never overwritten; "
                              "choose a new name or remove it first")
    try:
        tensors, tree = flatten_state(state)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {final}: cannot save: {err}") from None
    tmp = root / f"{_TMP}{name}-{os.getpid()}-{secrets.token_hex(4)}"
    _ACTIVE_TEMPS.add(tmp.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS))
        _fsync(tmp / TENSORS)
        _write_synced(tmp / STATE, json.dumps(tree, allow_nan=False).encode())
        # Checksums are taken from the files as written, so the manifest vouches for the disk.
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                 for f in _REQUIRED}
        manifest = {"format": _FORMAT, "version": _VERSION, "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync(tmp)
        if os.path.lexists(final):  # rename() would silently replace an empty directory
            raise FileExistsError(f"{final} appeared while writing")
        os.rename(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, ValueError, RuntimeError)):  # safetensors raises these
            raise CheckpointError(f"checkpoint {final}: write failed ({_one_line(err)}); nothing "
                                  "was written, older checkpoints are untouched") from err
        raise
    finally:
        _ACTIVE_TEMPS.discard(tmp.name)
    _fsync(root)  # makes the rename itself durable
    if keep is not None:
        _prune(root, keep, final, protect)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # directories too: that persists their entries
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _prune(root: Path, keep: int, just_written: Path, protect: str | None = None) -> None:
    doomed = [p for p in list_checkpoints(root)[:-keep]
              if p != just_written and p.name != protect]
    try:
        for path in doomed:
            # Renamed to a temp name first, so a kill mid-delete leaves a stale .tmp-* (removed
            # next time) rather than a half-deleted directory that still looks like a checkpoint.
            trash = root / f"{_TMP}{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(path, trash)
            shutil.rmtree(trash)
        for entry in root.iterdir():
            if entry.name.startswith(_TMP) and entry.is_dir() and _is_stale(entry.name):
                shutil.rmtree(entry)
    except OSError as err:
        raise CheckpointError(f"checkpoint {just_written}: written, but removing old checkpoints "
                              f"in {root} failed ({_one_line(err)}); remove them by hand") from err


def _is_stale(tmp_name: str) -> bool:
    parts = tmp_name.rsplit("-", 2)  # .tmp-<name>-<pid>-<random>; the name may contain '-'
    if tmp_name in _ACTIVE_TEMPS or len(parts) != 3 or not parts[1].isdigit():
        return False  # ours in flight, or not named by us: leave it alone
    pid = int(parts[1])
    if pid == os.getpid():  # not in flight here, so an earlier process with our pid left it
        return True
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C there instead of probing
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive under another user
        pass
    return False  # a live writer, maybe another process sharing this root


def load_checkpoint(path: Path) -> Any:
    """Verify a checkpoint against its manifest and load it.

    Args:
        path: the checkpoint directory.

    Returns:
        The saved structure; tensors are on the CPU.

    Raises:
        CheckpointError: a file missing, unreadable, of the wrong size or checksum, or not in the
            expected format, e.g. ``checkpoint X: state.json checksum mismatch (corrupt or
            truncated)``.
    """
    path = Path(path)
    try:
        return _load(path, lambda problem: CheckpointError(f"checkpoint {path}: {problem}"))
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({_one_line(err)})") from err


def _load(path: Path, fail: Callable[[str], CheckpointError]) -> Any:
    if not path.is_dir():
        raise fail("not a directory (missing or deleted)")
    if not (path / MANIFEST).is_file():
        raise fail(f"{MANIFEST} missing (incomplete write or damaged); use an older checkpoint")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes().decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError is a ValueError too
        raise fail(f"{MANIFEST} is not valid JSON ({_one_line(err)}); damaged") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != _FORMAT:
        raise fail(f"{MANIFEST} is not a bigbatch checkpoint manifest; damaged or foreign")
    if manifest.get("version") != _VERSION:
        raise fail(f"format version {manifest.get('version')!r} is not {_VERSION}; load it with "
                   "the bigbatch version that wrote it")
    for name in _REQUIRED:
        entry = files.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise fail(f"{MANIFEST} does not list {name}; damaged")
        if not (path / name).is_file():
            raise fail(f"{name} missing (deleted or incomplete copy)")
        size = (path / name).stat().st_size
        if size != entry["bytes"]:
            raise fail(f"{name} is {size} bytes, the manifest says {entry['bytes']} "
                       "(truncated or corrupt)")
        if _sha256(path / name) != entry.get("sha256"):
            raise fail(f"{name} checksum mismatch (corrupt or truncated)")
    try:
        tensors = load_file(str(path / TENSORS), device="cpu")
    except Exception as err:  # SafetensorError's base class varies between versions
        raise fail(f"{TENSORS} is not a valid safetensors file ({_one_line(err)}); "
                   "refusing to load it") from None
    try:
        tree = json.loads((path / STATE).read_bytes().decode("utf-8"))
    except ValueError as err:
        raise fail(f"{STATE} is not valid JSON ({_one_line(err)}); refusing to load it") from None
    try:
        return unflatten_state(tensors, tree)
    except CheckpointError as err:
        raise fail(str(err)) from None


def _subdirs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()),
                  key=lambda p: p.name)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoints (with a manifest; never ``.tmp-*``) in ``root``, oldest
    first by name; ``[]`` when ``root`` is missing."""
    return [p for p in _subdirs(root) if (p / MANIFEST).is_file()]


def load_latest(root: Path, usable: Callable[[Any], str | None] | None = None,
                skipped: list[tuple[Path, str]] | None = None,
                ) -> tuple[Path, Any, list[tuple[Path, str]]] | None:
    """Load the newest checkpoint that verifies, reporting every newer one that did not.

    A non-hidden directory holding any checkpoint file counts, so one that lost its manifest is
    reported, not skipped silently; ``.tmp-*`` directories never count.

    Args:
        root: the checkpoint directory.
        usable: given a loaded state, why this run cannot use it (None: it can); such a
            checkpoint is passed over for an older one — it is sound, so not rejected.
        skipped: receives ``(path, reason)`` of each checkpoint ``usable`` passed over.

    Returns:
        ``(path, state, rejected)``, where ``rejected`` holds ``(path, reason)`` for each newer
        checkpoint that failed, newest first; None when ``root`` holds no checkpoint at all.

    Raises:
        CheckpointError: checkpoints exist but none verifies.
    """
    candidates = [p for p in _subdirs(root)
                  if any((p / f).exists() for f in (MANIFEST, *_REQUIRED))]
    rejected: list[tuple[Path, str]] = []
    for path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            rejected.append((path, str(err).removeprefix(f"checkpoint {path}: ")))
            continue
        why = usable(state) if usable is not None else None
        if why is None:
            return path, state, rejected
        if skipped is not None:
            skipped.append((path, why))
    if not rejected:
        return None
    first, why = rejected[0]
    raise CheckpointError(f"checkpoints in {root}: all {len(rejected)} failed verification, the "
                          f"newest ({first.name}) because {why}; nothing to resume from")


def set_aside(path: Path) -> Path:
    """Rename a checkpoint that failed verification to a hidden ``.rejected-<name>-<random>``.

    Nothing is deleted (the files may still be worth inspecting), but the name is free again for
    the run to write a good checkpoint there, and neither listing nor pruning sees it any more.

    Returns:
        The new path.

    Raises:
        CheckpointError: the rename failed.
    """
    path = Path(path)
    target = path.with_name(f"{_REJECTED}{path.name}-{secrets.token_hex(4)}")
    try:
        os.rename(path, target)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: failed verification and cannot be moved aside "
                              f"({_one_line(err)}); move or remove it by hand") from err
    return target
