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
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn, TextIO

import torch
import yaml
from safetensors.torch import save_model

from .. import __version__
from ..engine import Accumulator, NonFiniteError, StepStats
from ..engine.precision import PrecisionPolicy
from ..memory import OutOfMemory, is_out_of_memory, release_memory
from ..noise import NoiseScaleEMA
from ..packing import pad_micro_batches
from ..plan import BatchPlan
from ..planner import MicroBatchChoice, plan_micro_batch
from ..schedule import lr_factor, parse_accum_schedule
from .checkpoint import CheckpointError, load_latest, save_checkpoint, set_aside
from .config import DEFAULT_GLOBAL_BATCH, ConfigError, TrainConfig, load_config_file
from .data import TokenWindows, eval_batches, global_batches, packed_micro_batches, take_samples
from .launch import Ranks, setup, wrap_model
from .progress import Progress
from .runlog import RunLog, plot_losses, read_metrics
from .runstate import Position, StopSignals, capture, checkpoint_name, model_state, restore
from .workload import (
    Workload,
    build_model,
    build_workload,
    lm_loss,
    load_data,
    make_optimizer,
    make_scheduler,
)

__all__ = ["RUN_FILES", "RunStopped", "TrainResult", "check_out_dir", "evaluate",
           "load_run_config", "plan_workload", "train"]

# The files a run writes; --overwrite replaces these and nothing else.
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "model.safetensors", "loss.png", "tb",
             "checkpoints")


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run's files are and how it ended."""

    out: Path
    steps: int
    main: bool  # rank 0 (or the only process): the one that reports
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
    """Exact token-mean loss over ``samples`` validation samples spread evenly over the set.

    A batch that runs out of memory halves the batch size and starts the evaluation over.

    Raises:
        OutOfMemory: a single sample does not fit.
    """
    n = min(samples, len(work.val))
    chosen = torch.linspace(0, len(work.val) - 1, n).round().long().unique()
    was_training = work.model.training
    work.model.eval()
    try:
        while True:
            try:
                return _evaluate(work, chosen, batch_size, autocast)
            except RuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                if batch_size == 1:
                    raise OutOfMemory(f"out of memory evaluating one sample ({err}); make one "
                                      "sample fit") from None
            release_memory(work.device)
            batch_size = (batch_size + 1) // 2
    finally:
        work.model.train(was_training)


def _evaluate(work: Workload, chosen: torch.Tensor, batch_size: int,
              autocast: Callable[[], AbstractContextManager]) -> tuple[float, int]:
    total = torch.zeros((), dtype=torch.float64, device=work.device)
    count = 0
    for idx in eval_batches(len(chosen), batch_size):
        batch = work.to_device(work.val.batch(chosen[idx]))
        with autocast():
            ls = lm_loss(work.model, batch)
        total += ls.sum.to(torch.float64)
        count += int(ls.count)
    return (float(total) / count if count else math.nan), count


def _eval_due(step: int, config: TrainConfig) -> bool:
    return step == config.steps or (config.eval_every > 0 and step % config.eval_every == 0)


class RunStopped(Exception):
    """The run stopped early (a signal, or a non-finite loss with ``--on-nonfinite stop``) after
    writing a checkpoint; ``exit_code`` is what the command should exit with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _start_run_folder(out: Path, config: TrainConfig, work: Workload, plan: BatchPlan) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite:
        _clear_run_files(out)
    resolved = {**config.to_dict(), "global_batch": plan.global_batch,
                "micro_batch": plan.micro_batch, "accum_steps": None,  # K follows the world
                "out": str(out), "overwrite": False}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (out / "run.json").write_text(json.dumps({
        "bigbatch": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "device": str(work.device), "world_size": plan.world_size,
        "accum_steps": plan.accum_steps, "argv": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "train_samples": len(work.train), "val_samples": len(work.val),
        "parameters": _count_parameters(work.model),
    }, indent=2) + "\n")


def _last_train_loss(metrics: Path) -> float:
    losses = [r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"]
    return losses[-1] if losses and losses[-1] is not None else math.nan


def train(config: TrainConfig, *, resume: bool = False, stream: TextIO | None = None,
          data: tuple[TokenWindows, TokenWindows] | None = None) -> TrainResult:
    """Train the default workload as ``config`` says and write the run folder.

    Everything that can be wrong with the input (config, data, output folder) is checked before
    anything is written. With ``resume``, ``config.out`` must hold a run: it continues from the
    newest checkpoint that verifies (mid-cycle included), so the final weights are bitwise those
    of an uninterrupted run on the same machine.

    Under ``torchrun`` each rank trains on its share of every global batch (see
    :mod:`bigbatch.launch`); rank 0 alone writes the run folder and shows progress.

    Returns:
        :class:`TrainResult`.

    Raises:
        BigBatchError: bad configuration, data, output folder or checkpoints (nothing written).
        RunStopped: stopped by SIGINT/SIGTERM or a non-finite loss, after a checkpoint.
    """
    ranks, device_name = setup(config.device)
    finished = False
    try:
        result = _train(config, ranks, device_name, resume, stream, data)
        finished = True
        return result
    finally:
        ranks.close(wait=finished)


def _train(config: TrainConfig, ranks: Ranks, device_name: str, resume: bool,
           stream: TextIO | None, data: tuple[TokenWindows, TokenWindows] | None) -> TrainResult:
    main = ranks.main
    stream = stream if stream is not None else sys.stderr
    if not main:
        stream = open(os.devnull, "w")  # noqa: SIM115 (closed with the process)
    comm = torch.device(device_name if device_name.startswith("cuda") else "cpu")
    fsdp = ranks.world_size > 1 and config.parallel == "fsdp2"
    if ranks.world_size > 1 and config.save_every_micro:
        raise ConfigError("--save-every-micro: mid-cycle checkpoints are for one process (each "
                          "rank holds its own partial gradient); use --save-every under torchrun")
    out = Path(config.out) if config.out else default_out_dir()
    if not resume:
        ranks.together("checking --out", comm, lambda: check_out_dir(out, config.overwrite))
    work = ranks.together("loading the data", comm, lambda: build_workload(
        replace(config, device=device_name), data if data is not None else load_data(config)))
    planned: list[str] = []
    if config.auto_micro_batch:
        config, planned = _choose_micro_batch(config, work, ranks, comm)
    plan = config.plan(world_size=ranks.world_size)
    net = wrap_model(work.model, config.parallel, ranks, list(work.model.blocks))
    opt = make_optimizer(work.model, config)
    sched = make_scheduler(opt, config)
    acc = Accumulator(net, opt, scheduler=sched, clip_grad_norm=config.clip_norm,
                      precision=config.precision,  # type: ignore[arg-type]
                      on_nonfinite="raise" if config.on_nonfinite == "stop" else "skip",
                      sync=config.grad_sync,  # type: ignore[arg-type]
                      noise_scale=config.noise_scale and not fsdp,
                      batchnorm="pooled" if config.batchnorm == "pooled" else "warn",
                      oom="auto" if config.on_oom == "split" else "raise")
    schedule = (parse_accum_schedule(config.accum_schedule, micro_batch=plan.micro_batch,
                                     world_size=ranks.world_size, k_final=plan.accum_steps)
                if config.accum_schedule else None)
    noise = NoiseScaleEMA()
    ckpt_root, metrics = out / "checkpoints", out / "metrics.jsonl"
    position = Position(0, 0, 0)
    notes: list[str] = []
    if resume:
        def load() -> Position:
            found = load_latest(ckpt_root)
            if found is None:
                raise ConfigError(f"--resume {out}: no checkpoint in {ckpt_root}; start a new run")
            path, state, rejected = found
            try:
                where = restore(state, work.model, opt, sched, acc, fsdp=fsdp)
                extra = state.get("extra") or {}
                noise.load_state_dict(extra["noise"])
                if schedule is not None:
                    schedule.load_state_dict(extra["schedule"])
            except KeyError as err:
                raise CheckpointError(f"--resume {out}: {path.name} lacks {err} (written by "
                                      "another bigbatch version?)") from None
            except CheckpointError as err:
                raise CheckpointError(f"--resume {out}: {path.name}: {err}") from None
            if main:
                for bad, why in rejected:  # the run will write these names again: set aside
                    notes.append(f"checkpoint {bad.name} is unusable ({why}); moved to "
                                 f"{set_aside(bad).name}, falling back")
            notes.append(f"resuming from {path.name}: step {where.step}, micro-batch "
                         f"{where.micro}/{plan.accum_steps}")
            return where

        position = ranks.together("loading the checkpoint", comm, load)
        if main:
            notes += _rewind_metrics(metrics, position.metrics_bytes)
    elif main:
        _start_run_folder(out, config, work, plan)

    def save(step: int, micro: int) -> Path:
        where = Position(step, micro, metrics.stat().st_size if main else 0)
        state = capture(where, work.model, opt, sched, acc, fsdp=fsdp)  # all ranks (FSDP2)
        state["extra"] = {"noise": noise.state_dict(),
                          "schedule": None if schedule is None else schedule.state_dict()}
        name = checkpoint_name(step, micro)
        ranks.together("writing a checkpoint", comm, lambda: main and save_checkpoint(
            ckpt_root, name, state, keep=config.keep))
        return ckpt_root / name

    log = RunLog(out, purge_step=position.step + 1 if resume else None) if main else None
    progress = Progress(config.steps, stream, start=position.step)
    for note in planned + notes:
        progress.write(note)
    if config.on_oom == "split" and not acc.oom_split:
        progress.write("note: out-of-memory splitting is off under FSDP2 (its state cannot "
                       "survive an out-of-memory error mid-backward)")
    where = f" × {ranks.world_size} ranks ({config.parallel})" if ranks.world_size > 1 else ""
    cut = (f"packed by length into micro-batches of at most {config.micro_tokens:,} tokens"
           if config.micro_tokens else
           f"{plan.accum_steps} micro-batches of {plan.micro_batch} × {config.seq_len} bytes")
    progress.write(
        f"training {_count_parameters(work.model):,} parameters on {work.device}{where}: "
        f"{config.steps} steps of global batch {plan.global_batch} = {cut}")
    batches = global_batches(len(work.train), plan.global_batch, config.seed,
                             start_step=position.step)
    step, first_micro, k = position.step, position.micro, plan.accum_steps
    tokens_per_sample = float(config.seq_len)  # refined from each step's item count
    max_rows = acc.max_rows
    val_loss = math.nan
    start = time.perf_counter()
    try:
        with StopSignals() as signals:
            while step < config.steps:
                if schedule is None:
                    step_plan, rows = plan, next(batches)
                else:  # K of this step (a step resumed mid-cycle keeps the one it had)
                    if first_micro == 0:
                        schedule.next_k(step, noise.value / tokens_per_sample)
                    step_plan = BatchPlan(micro_batch=plan.micro_batch, accum_steps=schedule.k,
                                          world_size=ranks.world_size)
                    rows = take_samples(len(work.train), config.seed, schedule.samples,
                                        step_plan.global_batch)
                    _scale_lr(opt, sched, lr_factor(config.lr_scaling, step_plan.global_batch,
                                                     plan.global_batch))
                k = step_plan.accum_steps
                share = slice(ranks.rank * step_plan.local_batch,
                              (ranks.rank + 1) * step_plan.local_batch)
                rows = rows[share]  # this rank's disjoint share of the global batch
                if config.micro_tokens:  # sorted by length, ≤ N tokens each, padding trimmed
                    micro_batches = packed_micro_batches(work.train, rows, config.micro_tokens,
                                                         work.device)
                    if ranks.world_size > 1:  # every rank runs as many (empty ones add 0)
                        most = -ranks.smallest(-len(micro_batches), comm)
                        micro_batches = pad_micro_batches(micro_batches, most)
                    k = len(micro_batches)
                else:
                    micro_batches = step_plan.split(work.to_device(work.train.batch(rows)))
                done_before = (step * k if schedule is None
                               else schedule.samples // schedule.micro_samples)
                for i in range(first_micro, len(micro_batches)):
                    try:
                        acc.accumulate(micro_batches[i], lm_loss,
                                       last=i == len(micro_batches) - 1)
                    except OutOfMemory as e:
                        acc.discard()
                        if ranks.world_size > 1:
                            raise
                        path = save(step, 0)
                        raise RunStopped(f"stopped: {e}. The last good state is in {path}",
                                         1) from e
                    if ranks.world_size > 1:
                        continue  # ranks stop together, between optimizer steps (below)
                    if signals.received:
                        _stop(signals.received, save(step, i + 1), out, step, i + 1, k)
                    every = config.save_every_micro
                    if every and (done_before + i + 1) % every == 0 and i + 1 < k:
                        save(step, i + 1)
                first_micro = 0
                try:
                    stats = acc.finish()
                except NonFiniteError as e:
                    path = save(step, 0)
                    raise RunStopped(f"stopped: {e}. The last good state is in {path}", 1) from e
                step += 1
                if schedule is not None:
                    schedule.took(k)
                if stats.count:
                    tokens_per_sample = stats.count / step_plan.global_batch
                rows_note = _oom_note(stats, max_rows, step)
                if rows_note:
                    progress.write(rows_note)
                max_rows = stats.max_rows
                b_noise = noise.update(stats.noise)
                tokens_per_s = stats.count / stats.seconds if stats.seconds > 0 else 0.0
                if log is not None:
                    log.train(stats, step, tokens_per_s, {
                        "global_batch": step_plan.global_batch, "accum_steps": k,
                        "noise_scale": _finite_or_none(b_noise),
                        "noise_trace": None if stats.noise is None else stats.noise.trace,
                        "noise_grad_sq": None if stats.noise is None else stats.noise.grad_sq,
                        "oom_splits": stats.oom_splits, "max_rows": stats.max_rows})
                note = f" | skipped: {stats.skip_reason}" if stats.skipped else ""
                if math.isfinite(b_noise):
                    note += f" | B_noise {b_noise:,.0f} tok"
                if schedule is not None or config.micro_tokens:
                    note += f" | K {k}"
                progress.update(step, stats.loss, tokens_per_s, stats.lr, note)
                if _eval_due(step, config):
                    val_loss, val_items = evaluate(work, config.eval_samples,
                                                   acc.max_rows or plan.micro_batch,
                                                   acc.precision.autocast)
                    if log is not None:
                        log.eval(step, val_loss, val_items)
                    progress.write(f"step {step}: validation loss {val_loss:.4f} "
                                   f"(uniform {math.log(256):.2f})")
                stop = signals.received
                if ranks.world_size > 1 and not ranks.agree(stop is None, comm):
                    stop = stop or signal.SIGTERM  # another rank was signalled
                if stop:
                    _stop(stop, save(step, 0), out, step, 0, k, ranks.world_size)
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    save(step, 0)
            if not (ckpt_root / checkpoint_name(step, 0)).exists():
                save(step, 0)  # the clean stop
    finally:
        progress.close()
        if log is not None:
            log.close()
    if math.isnan(val_loss):  # resumed after the last step: report the final weights anyway
        val_loss, _ = evaluate(work, config.eval_samples, acc.max_rows or plan.micro_batch,
                               acc.precision.autocast)
    final = work.model
    if fsdp:  # gather the shards (all ranks take part) into a plain copy on rank 0
        weights = model_state(work.model, fsdp=True)
        final = build_model(replace(config, device="cpu"), torch.device("cpu"))
        if main:
            final.load_state_dict(weights)
    if main:
        save_model(final, str(out / "model.safetensors"))
        plot_losses(metrics, out / "loss.png",
                    title=f"bigbatch train: global batch {plan.global_batch} = "
                          f"{plan.accum_steps} micro-batches of {plan.micro_batch}"
                          + (f" × {ranks.world_size} ranks" if ranks.world_size > 1 else ""))
    ranks.agree(True, comm)  # rank 0 has written the run's files before anyone returns
    return TrainResult(out=out, steps=config.steps, main=main,
                       final_train_loss=_last_train_loss(metrics) if main else math.nan,
                       final_val_loss=val_loss, seconds=time.perf_counter() - start)


def plan_workload(config: TrainConfig, work: Workload, *, world_size: int = 1,
                  candidates: Sequence[int] | None = None, repeats: int = 3) -> MicroBatchChoice:
    """:func:`~bigbatch.planner.plan_micro_batch` for the default workload: its model, loss,
    optimizer, precision and first global batch, under ``config.memory``."""
    g = config.global_batch or DEFAULT_GLOBAL_BATCH
    rows = next(global_batches(len(work.train), g, config.seed))

    def make_batch(m: int) -> dict[str, torch.Tensor]:
        return work.to_device(work.train.batch(rows[:m]))

    precision = PrecisionPolicy(config.precision, work.model, work.device)
    return plan_micro_batch(work.model, lm_loss, make_batch, global_batch=g,
                            optimizer=make_optimizer(work.model, config), world_size=world_size,
                            budget=config.memory, candidates=candidates, repeats=repeats,
                            autocast=precision.autocast)


def _choose_micro_batch(config: TrainConfig, work: Workload, ranks: Ranks, comm: torch.device,
                        ) -> tuple[TrainConfig, list[str]]:
    """Resolve ``--micro-batch auto``: plan on this rank, then take the smallest over ranks."""
    choice = ranks.together("planning the micro-batch", comm, lambda: plan_workload(
        config, work, world_size=ranks.world_size))
    micro = ranks.smallest(choice.micro_batch, comm)
    lines = ["--micro-batch auto: candidates (forward+backward timed on this machine)",
             choice.table(), choice.summary()]
    if micro != choice.micro_batch:
        lines.append(f"another rank has less memory: micro-batch {micro} on every rank")
    return replace(config, global_batch=choice.plan.global_batch, micro_batch=micro), lines


def _oom_note(stats: StepStats, before: int | None, step: int) -> str:
    """A line when micro-batches ran out of memory, or grew back after clean steps."""
    if stats.oom_splits:
        return (f"step {step}: {stats.oom_splits} micro-batch piece(s) ran out of memory and were "
                f"split in two; micro-batches now run in pieces of at most {stats.max_rows} rows "
                "(the update is the same)")
    if before is not None and stats.max_rows != before:
        now = "whole" if stats.max_rows is None else f"in pieces of {stats.max_rows} rows"
        return f"step {step}: no out-of-memory for a while; micro-batches run {now} again"
    return ""


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _scale_lr(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
              factor: float) -> None:
    """Set each group's learning rate to the schedule's value × ``factor`` for this step (the
    scheduler recomputes its own value from the step count, so factors never compound)."""
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr * factor


def _count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model (FSDP2 shards count at their full size)."""
    return sum(p.numel() for p in set(model.parameters()))


def _rewind_metrics(metrics: Path, size: int) -> list[str]:
    """Drop metric lines written after the checkpoint (they will be written again)."""
    if not metrics.is_file():
        metrics.touch()
        return [f"{metrics.name} was missing; it restarts at the checkpoint's step"]
    if metrics.stat().st_size < size:  # truncate() would pad with NUL bytes
        return [f"{metrics.name} is shorter than at the checkpoint; kept as it is"]
    with metrics.open("r+b") as f:
        f.truncate(size)
    return []


def _stop(signum: int, path: Path, out: Path, step: int, micro: int, k: int,
          world: int = 1) -> NoReturn:
    name = signal.Signals(signum).name
    how = f"torchrun --nproc-per-node {world} -m bigbatch train" if world > 1 else "bigbatch train"
    raise RunStopped(
        f"stopped by {name} at step {step}, micro-batch {micro}/{k}; checkpoint {path}; "
        f"resume with: {how} --resume {out}", 128 + signum)


def load_run_config(out: Path) -> TrainConfig:
    """The configuration a run folder was started with (for ``--resume``).

    Raises:
        ConfigError: the folder or its ``config.yaml`` is missing or unreadable.
    """
    path = out / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {out}: no config.yaml there; give the folder of a run")
    values = load_config_file(path)
    values["out"] = str(out)
    return TrainConfig(**values)
