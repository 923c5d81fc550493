"""A run's folder: refusing one that holds something else, starting it, reading its config back.

A run folder holds ``config.yaml`` (the resolved configuration, without the folder itself, so the
file is reusable as ``--config`` for a new run), ``run.json`` (versions, device, command line),
``fingerprint.json`` (the data's, see :mod:`.fingerprint`), ``metrics.jsonl``,
``model.safetensors``, ``loss.png``, ``tb/`` and ``checkpoints/``; with
``--early-stop`` ``best/``, with ``--log-to`` ``mlruns/``, ``wandb/`` and ``tracking.json``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from .config import ConfigError, TrainConfig, flag, load_config_file

__all__ = ["RUN_FILES", "RunLock", "check_out_dir", "default_out_dir", "differences",
           "extended", "is_finished", "load_run_config", "rewind_metrics", "saved_config",
           "start_run_folder", "write_steps"]

# The files a run writes; --overwrite replaces these and nothing else.
RUN_FILES = ("config.yaml", "run.json", "fingerprint.json", "metrics.jsonl", "model.safetensors",
             "model", "adapter", "samples.md", "loss.png", "tb", "checkpoints", "best",
             "mlruns", "wandb", "tracking.json")
TRAINED = ("model.safetensors", "model", "adapter")  # what a finished run leaves
# Where the run is written is not part of what it is: config.yaml leaves these out.
_NOT_SAVED = ("out", "overwrite")


def default_out_dir(prefix: str = "") -> Path:
    """``runs/<prefix><date>-<time>``, relative to the working directory."""
    return Path("runs") / f"{prefix}{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds files, unless ``overwrite`` (changes nothing).

    Raises:
        ConfigError: ``out`` is a file, or a non-empty folder and ``overwrite`` is False.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(p.name != ".lock" for p in out.iterdir()) and not overwrite:
        holds_run = (out / "config.yaml").exists() or (out / "run.json").exists()
        what = "already holds a run" if holds_run else "is not empty"
        raise ConfigError(
            f"--out {out} {what}; choose a new folder or pass --overwrite to replace its run files"
        )


def start_run_folder(out: Path, config: TrainConfig, info: dict[str, Any],
                     fingerprint: dict[str, Any] | None = None) -> None:
    """Create ``out`` (clearing the run files with ``--overwrite``) and write ``config.yaml``,
    ``run.json`` (``info`` adds the device, world size, data sizes …) and ``fingerprint.json``
    (the data's, see :mod:`.fingerprint`)."""
    out.mkdir(parents=True, exist_ok=True)
    if config.checkpoint.overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    saved = config.to_file_dict()
    for key in _NOT_SAVED:
        saved["checkpoint"].pop(key)
    # run.json first and config.yaml last, each whole or not at all: a folder with a config.yaml
    # holds a run that --resume can start or continue
    if fingerprint is not None:
        _write_atomic(out / "fingerprint.json", json.dumps(fingerprint, indent=1) + "\n")
    _write_atomic(out / "run.json", json.dumps({
        "bigbatch": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "argv": sys.argv, "started": _dt.datetime.now().isoformat(timespec="seconds"), **info,
    }, indent=2) + "\n")
    _write_atomic(out / "config.yaml", yaml.safe_dump(saved, sort_keys=False))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run_config(out: Path) -> TrainConfig:
    """The configuration a run folder was started with (for ``--resume``), ``out`` its folder.

    Raises:
        ConfigError: the folder or its ``config.yaml`` is missing or unreadable.
    """
    path = out / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {out}: no config.yaml there; give the folder of a run")
    values = load_config_file(path)
    values.update(out=str(out), overwrite=False)
    return TrainConfig.of(**values)


def extended(out: Path, saved: TrainConfig, steps: int) -> TrainConfig:
    """The run in ``out`` (configured as ``saved``) with ``--steps`` raised to ``steps``; the
    learning-rate schedule must not depend on the total, so the steps already taken stay those
    of a run configured with ``steps`` from the start.

    Raises:
        ConfigError: ``steps`` is below the run's, or the schedule decays over the total.
    """
    have = saved.optim.steps
    if steps < have:
        raise ConfigError(f"--resume {out} --steps {steps}: the run has {have} steps and can only "
                          f"be extended; give --steps {have} or more")
    if steps > have and saved.optim.schedule != "constant":
        fresh = (f"start a new run with --steps {steps} (and --schedule constant to extend it "
                 "later)" if saved.model.builtin else
                 f"start a new run from its weights (bigbatch export {out}, then bigbatch train "
                 f"--model {out / 'export'} --steps …)")
        raise ConfigError(
            f"--resume {out} --steps {steps}: the run's --schedule {saved.optim.schedule} decays "
            f"the learning rate over its {have} steps, so more steps would change the steps "
            f"already taken; only a --schedule constant run (warm-up, then constant) can be "
            f"extended: {fresh}")
    return saved.replace(steps=steps)


def write_steps(out: Path, steps: int) -> None:
    """Set ``steps`` in the run's ``config.yaml`` (atomically), keeping the rest of the file as
    it is, comments included; a file whose ``steps:`` line is not plain is written anew from its
    values."""
    path = out / "config.yaml"
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    want = copy.deepcopy(raw)
    if isinstance(want.get("optim"), dict) and "steps" in want["optim"]:
        want["optim"]["steps"] = steps
    else:
        want["steps"] = steps
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if re.match(r"\s*steps\s*:", line)]
    if len(found) == 1:  # edit that line, if that changes that one value and nothing else
        i = found[0]
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        new = "".join([*lines[:i], f"{indent}steps: {steps}\n", *lines[i + 1:]])
        if yaml.safe_load(new) == want:
            _write_atomic(path, new)
            return
    _write_atomic(path, yaml.safe_dump(want, sort_keys=False))


def rewind_metrics(metrics: Path, size: int) -> list[str]:
    """Drop metric lines written after a checkpoint (they will be written again); returns notes."""
    if not metrics.is_file():
        metrics.touch()
        return [f"{metrics.name} was missing; it restarts at the checkpoint's step"]
    if metrics.stat().st_size < size:  # truncate() would pad with NUL bytes
        return [f"{metrics.name} is shorter than at the checkpoint; kept as it is"]
    with metrics.open("r+b") as f:
        f.truncate(size)
    return []


def saved_config(out: Path) -> TrainConfig | None:
    """The configuration a run folder holds, or None when it holds none (no config.yaml)."""
    return load_run_config(out) if (out / "config.yaml").is_file() else None


def is_finished(out: Path, config: TrainConfig) -> bool:
    """Whether the run in ``out`` reached its last step and wrote its model."""
    from .runstate import checkpoint_name

    last = out / "checkpoints" / checkpoint_name(config.optim.steps, 0)
    return last.is_dir() and any((out / name).exists() for name in TRAINED)


def differences(saved: TrainConfig, given: TrainConfig, world_size: int) -> list[str]:
    """Flags in which ``given`` (from a command line) describes another run than ``saved`` (a
    run folder's), after resolving the batch sizes as a run records them."""
    want = dict(saved.flat())
    have = dict(given.flat())
    if given.batch.auto_micro_batch:  # the run recorded the size it chose
        have["micro_batch"] = want["micro_batch"]
        have["global_batch"] = have["global_batch"] or want["global_batch"]
    else:
        plan = given.plan(world_size)
        have.update(global_batch=plan.global_batch, micro_batch=plan.micro_batch)
    have["accum_steps"] = want["accum_steps"]
    if have["pack_cost"] is None:  # measured at the start, and recorded
        have["pack_cost"] = want["pack_cost"]
    if have["data"] is not None:
        have["data"] = str(Path(have["data"]).absolute())
    for key in _NOT_SAVED:
        have[key] = want[key]
    return [f"{flag(k)} {have[k]!r} (the run has {want[k]!r})" for k in want if have[k] != want[k]]


class RunLock:
    """One writer per run folder: an advisory ``fcntl`` lock on ``out/.lock`` holding the writer's
    pid. The kernel releases it when the process ends, however it ends (SIGKILL included), so a
    lock is never left behind. A no-op where ``fcntl`` does not exist."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises ConfigError (with the other writer's pid) when another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{self.path.parent} is being written by process {pid} (another "
                              "bigbatch train); wait for it to end or stop it, then run this "
                              "again") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
