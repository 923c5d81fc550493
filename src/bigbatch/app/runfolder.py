"""A run's folder: refusing one that holds something else, starting it, reading its config back.

A run folder holds ``config.yaml`` (the resolved configuration, without the folder itself, so the
file is reusable as ``--config`` for a new run), ``run.json`` (versions, device, command line),
``metrics.jsonl``, ``model.safetensors``, ``loss.png``, ``tb/`` and ``checkpoints/``.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__
from .config import ConfigError, TrainConfig, load_config_file

__all__ = ["RUN_FILES", "check_out_dir", "default_out_dir", "load_run_config", "rewind_metrics",
           "start_run_folder"]

# The files a run writes; --overwrite replaces these and nothing else.
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "model.safetensors", "loss.png", "tb",
             "checkpoints")
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
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        holds_run = any((out / name).exists() for name in RUN_FILES)
        what = "already holds a run" if holds_run else "is not empty"
        raise ConfigError(
            f"--out {out} {what}; choose a new folder or pass --overwrite to replace its run files"
        )


def start_run_folder(out: Path, config: TrainConfig, info: dict[str, Any]) -> None:
    """Create ``out`` (clearing the run files with ``--overwrite``) and write ``config.yaml``
    and ``run.json`` (``info`` adds the device, world size, data sizes …)."""
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
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (out / "run.json").write_text(json.dumps({
        "bigbatch": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "argv": sys.argv, "started": _dt.datetime.now().isoformat(timespec="seconds"), **info,
    }, indent=2) + "\n")


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
