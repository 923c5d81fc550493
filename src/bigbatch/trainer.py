"""The training loop around the engine: data, evaluation, progress, metrics and the run folder.

The sequence of global batches depends only on the data, the seed and the global batch size
(:func:`bigbatch.data.global_batches`); each global batch is then split into micro-batches. So
changing the micro-batch size or K never changes which samples a step trains on, and with exact
accumulation the weights end up the same up to float rounding.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import yaml
from safetensors.torch import save_model

from . import __version__
from .config import ConfigError, TrainConfig
from .data import TokenWindows, eval_batches, global_batches
from .engine import Accumulator
from .progress import Progress
from .runlog import RunLog, plot_losses
from .workload import Workload, build_workload, lm_loss, load_data, make_optimizer, make_scheduler

__all__ = ["RUN_FILES", "TrainResult", "check_out_dir", "evaluate", "train"]

# The files a run writes; --overwrite replaces these and nothing else.
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "model.safetensors", "loss.png", "tb")


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run's files are and how it ended."""

    out: Path
    steps: int
    final_train_loss: float
    final_val_loss: float
    seconds: float


def default_out_dir(prefix: str = "") -> Path:
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


def _clear_run_files(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@torch.no_grad()
def evaluate(work: Workload, samples: int, batch_size: int,
             autocast: Callable[[], AbstractContextManager]) -> tuple[float, int]:
    """Exact token-mean loss over ``samples`` validation samples spread evenly over the set."""
    n = min(samples, len(work.val))
    chosen = torch.linspace(0, len(work.val) - 1, n).round().long().unique()
    was_training = work.model.training
    work.model.eval()
    total = torch.zeros((), dtype=torch.float64, device=work.device)
    count = 0
    for idx in eval_batches(len(chosen), batch_size):
        batch = work.to_device(work.val.batch(chosen[idx]))
        with autocast():
            ls = lm_loss(work.model, batch)
        total += ls.sum.to(torch.float64)
        count += int(ls.count)
    work.model.train(was_training)
    return (float(total) / count if count else math.nan), count


def _eval_due(step: int, config: TrainConfig) -> bool:
    return step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0)


def train(config: TrainConfig, *, stream: TextIO | None = None,
          data: tuple[TokenWindows, TokenWindows] | None = None) -> TrainResult:
    """Train the default workload as ``config`` says and write the run folder.

    Everything that can be wrong with the input (config, data, output folder) is checked before
    anything is written.

    Returns:
        :class:`TrainResult`.

    Raises:
        BigBatchError: bad configuration, data or output folder (nothing written).
    """
    stream = stream if stream is not None else sys.stderr
    plan = config.plan()
    out = Path(config.out) if config.out else default_out_dir()
    check_out_dir(out, config.overwrite)
    data = data if data is not None else load_data(config)
    work = build_workload(config, data)
    opt = make_optimizer(work.model, config)
    sched = make_scheduler(opt, config)
    acc = Accumulator(work.model, opt, scheduler=sched, clip_grad_norm=config.clip_norm,
                      precision=config.precision)  # type: ignore[arg-type]

    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        _clear_run_files(out)
    resolved = {**config.to_dict(), "global_batch": plan.global_batch,
                "micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps,
                "out": str(out)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (out / "run.json").write_text(json.dumps({
        "bigbatch": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": str(work.device), "world_size": plan.world_size, "argv": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "train_samples": len(work.train), "val_samples": len(work.val),
        "parameters": sum(p.numel() for p in set(work.model.parameters())),
    }, indent=2) + "\n")

    log = RunLog(out)
    progress = Progress(config.steps, stream)
    progress.write(
        f"training {sum(p.numel() for p in set(work.model.parameters())):,} parameters on "
        f"{work.device}: {config.steps} steps of global batch {plan.global_batch} = "
        f"{plan.accum_steps} micro-batches of {plan.micro_batch} × {config.seq_len} bytes"
    )
    batches = global_batches(len(work.train), plan.global_batch, config.seed)
    stats = None
    val_loss = math.nan
    start = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            batch = work.to_device(work.train.batch(next(batches)))
            stats = acc.step(plan.split(batch), lm_loss)
            tokens_per_s = stats.count / stats.seconds if stats.seconds > 0 else 0.0
            log.train(stats, step, tokens_per_s)
            note = f" | skipped: {stats.skip_reason}" if stats.skipped else ""
            progress.update(step, stats.loss, tokens_per_s, stats.lr, note)
            if _eval_due(step, config):
                val_loss, val_items = evaluate(work, config.eval_samples, plan.micro_batch,
                                               acc.precision.autocast)
                log.eval(step, val_loss, val_items)
                progress.write(f"step {step}: validation loss {val_loss:.4f} "
                               f"(uniform {math.log(256):.2f})")
    finally:
        progress.close()
        log.close()
    save_model(work.model, str(out / "model.safetensors"))
    plot_losses(out / "metrics.jsonl", out / "loss.png",
                title=f"bigbatch train: global batch {plan.global_batch} = "
                      f"{plan.accum_steps} micro-batches of {plan.micro_batch}")
    assert stats is not None
    return TrainResult(out=out, steps=config.steps, final_train_loss=stats.loss,
                       final_val_loss=val_loss, seconds=time.perf_counter() - start)
