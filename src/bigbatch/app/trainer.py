"""``bigbatch train``: set up in steps, then one short loop around the engine.

:class:`Trainer` builds the run in order — the workload (data and model, and the micro-batch when
``--micro-batch auto``), the engine (the wrapped model, optimizer, scheduler, accumulator and K
schedule), the run folder or the checkpoint it resumes from, the logs — and then loops: take the
step's micro-batches, accumulate them (checkpointing mid-cycle and answering signals between
micro-batches), finish the step, log, evaluate, save.

The sequence of global batches depends only on the data, the seed and the global batch size
(:func:`bigbatch.app.data.global_batches`); each global batch is then split into micro-batches. So
changing the micro-batch size or K never changes which samples a step trains on, and with exact
accumulation the weights end up the same up to float rounding.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

import torch

from ..engine import Accumulator, NonFiniteError, StepStats
from ..memory import OutOfMemory
from ..noise import NoiseScaleEMA
from ..packing import pad_micro_batches
from ..plan import BatchPlan
from ..schedule import AccumSchedule, lr_factor, parse_accum_schedule
from .artifacts import final_model, sample_completions, save_final, write_samples
from .checkpointer import Checkpointer
from .config import ConfigError, TrainConfig
from .data import TokenWindows, global_batches, packed_micro_batches, take_samples
from .earlystop import EarlyStopping, save_best
from .fingerprint import check_fingerprint, data_fingerprint
from .launch import Ranks, setup, wrap_model
from .models.gpt import num_parameters
from .packmode import choose_packing
from .progress import Progress
from .runfolder import (
    RunLock,
    check_out_dir,
    default_out_dir,
    extended,
    saved_config,
    start_run_folder,
    write_steps,
)
from .runlog import RunLog, last_train_loss, plot_losses
from .runstate import StopSignals, model_state
from .startup import RunShape, batch_line, data_lines, noise_line, precision_note, run_samples
from .tracking import check_installed
from .workload import (
    Workload,
    build_workload,
    choose_micro_batch,
    evaluate,
    make_optimizer,
    make_scheduler,
)

__all__ = ["RunStopped", "TrainResult", "Trainer", "train"]

# the engine's skip reasons that --max-skips counts (an fp16 overflow only lowers the loss scale)
_NONFINITE = ("non-finite loss", "non-finite gradient")


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run's files are and how it ended."""

    out: Path
    steps: int
    main: bool  # rank 0 (or the only process): the one that reports
    final_train_loss: float
    final_val_loss: float
    seconds: float
    final_metrics: str = ""  # the validation metrics, as the log shows them


class RunStopped(Exception):
    """The run stopped early (a signal, an out-of-memory row, or a non-finite loss with
    ``--on-nonfinite stop``) after writing a checkpoint; ``exit_code`` is what to exit with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def train(config: TrainConfig, *, resume: bool = False, stream: TextIO | None = None,
          data: tuple[TokenWindows, TokenWindows] | None = None) -> TrainResult:
    """Train as ``config`` says and write the run folder.

    Everything that can be wrong with the input (config, data, output folder) is checked before
    anything is written. With ``resume``, ``config.checkpoint.out`` must hold a run: it continues
    from the newest checkpoint that verifies (mid-cycle included), so the final weights are
    bitwise those of an uninterrupted run on the same machine. Under ``torchrun`` each rank trains
    on its share of every global batch (see :mod:`bigbatch.app.launch`); rank 0 alone writes the
    run folder and shows progress.

    Raises:
        BigBatchError: bad configuration, data, output folder or checkpoints (nothing written).
        RunStopped: stopped by SIGINT/SIGTERM or a non-finite loss, after a checkpoint.
    """
    ranks, device_name = setup(config.runtime.device)
    finished = False
    try:
        result = Trainer(config, ranks, device_name, resume=resume, stream=stream,
                         data=data).run()
        finished = True
        return result
    finally:
        ranks.close(wait=finished)


class Trainer:
    """One run of ``bigbatch train`` (see the module docstring). Call :meth:`run` once."""

    def __init__(self, config: TrainConfig, ranks: Ranks, device_name: str, *, resume: bool,
                 stream: TextIO | None = None,
                 data: tuple[TokenWindows, TokenWindows] | None = None) -> None:
        self.config, self.ranks, self.resume, self.data = config, ranks, resume, data
        self.device_name = device_name
        self.main = ranks.main
        self.stream = stream if stream is not None else sys.stderr
        if not self.main:
            self.stream = open(os.devnull, "w")  # noqa: SIM115 (closed with the process)
        self.comm = torch.device(device_name if device_name.startswith("cuda") else "cpu")
        self.fsdp = ranks.world_size > 1 and config.runtime.parallel == "fsdp2"
        out = config.checkpoint.out
        self.out = Path(out) if out else default_out_dir()
        self.notes: list[str] = []
        self.extend_from: int | None = None  # --steps raised on resume: the run's old total

    # -- setup ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.lock = RunLock(self.out)
        try:
            self._check_inputs()
            self._setup_workload()
            self._setup_engine()
            self._setup_run()
            self._setup_logs()
            start = time.perf_counter()
            ok = False  # the trackers record how the run ended
            try:
                try:
                    self._loop()
                finally:
                    self.progress.close()
                result = self._finish(time.perf_counter() - start)
                ok = True
                return result
            finally:
                if self.log is not None:
                    self.log.close(ok=ok)
        finally:
            self.lock.release()

    def _check_inputs(self) -> None:
        config, ranks = self.config, self.ranks
        check_installed(config.checkpoint.log_to)  # --log-to mlflow without mlflow: nothing written
        if self.fsdp and config.checkpoint.save_every_micro:
            raise ConfigError("--save-every-micro: FSDP2 keeps a cycle's partial gradient "
                              "unsharded, out of reach of a checkpoint; use --parallel ddp, or "
                              "--save-every (between optimizer steps)")
        if config.data.data is not None:  # a resume from another folder must find the data
            self.config = config = config.replace(data=str(Path(config.data.data).absolute()))
        if not self.resume:
            overwrite = config.checkpoint.overwrite
            ranks.together("checking --out", self.comm, lambda: check_out_dir(self.out, overwrite))
        elif self.main:  # one writer per run folder, from the start; the data it started with
            ranks.together("locking the run folder", self.comm, self._lock_resumed)
        else:
            ranks.together("locking the run folder", self.comm, lambda: None)

    def _lock_resumed(self) -> None:
        """Lock the run folder, and check the run can go on as configured: on the same data,
        and with ``--steps`` raised only where the schedule allows it (see
        :func:`.runfolder.extended`)."""
        self.lock.acquire()
        check_fingerprint(self.out, self.config)
        saved = saved_config(self.out)
        if saved is not None and saved.optim.steps != self.config.optim.steps:
            extended(self.out, saved, self.config.optim.steps)
            self.extend_from = saved.optim.steps

    def _setup_workload(self) -> None:
        config = self.config
        self.work: Workload = self.ranks.together("loading the data", self.comm, lambda: (
            build_workload(config.replace(device=self.device_name), self.data)))
        self.notes += self.work.notes
        if config.batch.auto_micro_batch:
            self.config, lines = choose_micro_batch(config, self.work, self.ranks, self.comm)
            self.notes += lines
        self.config, self.packing, lines = choose_packing(self.config, self.work, self.ranks,
                                                          self.comm)
        self.notes += lines
        self.plan = self.config.plan(world_size=self.ranks.world_size)

    def _setup_engine(self) -> None:
        config, work = self.config, self.work
        net = wrap_model(work.model, config.runtime.parallel, self.ranks, work.blocks)
        self.opt = make_optimizer(work.model, config)
        self.sched = make_scheduler(self.opt, config)
        self.acc = Accumulator(
            net, self.opt, scheduler=self.sched, clip_grad_norm=config.optim.clip_norm,
            precision=config.runtime.precision,  # type: ignore[arg-type]
            on_nonfinite=config.runtime.on_nonfinite,  # type: ignore[arg-type]
            sync=config.runtime.grad_sync,  # type: ignore[arg-type]
            noise_scale=config.runtime.noise_scale and not self.fsdp,
            batchnorm="pooled" if config.model.batchnorm == "pooled" else "warn",
            oom=config.runtime.on_oom)  # type: ignore[arg-type]
        self.schedule: AccumSchedule | None = None
        if config.batch.accum_schedule:
            self.schedule = parse_accum_schedule(
                config.batch.accum_schedule, micro_batch=self.plan.micro_batch,
                world_size=self.ranks.world_size, k_final=self.plan.accum_steps)
        self.noise = NoiseScaleEMA()
        patience = config.data.early_stop
        self.early = EarlyStopping(patience) if patience else None
        self.checkpoints = Checkpointer(
            self.out, ranks=self.ranks, comm=self.comm, model=work.model, optimizer=self.opt,
            scheduler=self.sched, acc=self.acc,
            extras={"noise": self.noise, "schedule": self.schedule, "early_stop": self.early},
            keep=config.checkpoint.keep, fsdp=self.fsdp,
            trainable_only=bool(work.hf is not None and work.hf.lora))

    def _setup_run(self) -> None:
        """Resume from the newest checkpoint, or start the run folder."""
        self.step, self.first_micro = 0, 0
        if self.resume:
            position, notes = self.checkpoints.resume()
            self.step, self.first_micro = position.step, position.micro
            self.notes += notes
            if self.main and self.extend_from is not None:
                write_steps(self.out, self.config.optim.steps)
                self.notes.append(f"extending the run from {self.extend_from} to "
                                  f"{self.config.optim.steps} steps (config.yaml updated)")
            return
        self.ranks.together("locking the run folder", self.comm,
                            self._lock_new if self.main else lambda: None)
        if self.main:  # the sizes resolved; K follows the world size (resume elsewhere)
            resolved = self.config.replace(global_batch=self.plan.global_batch,
                                           micro_batch=self.plan.micro_batch, accum_steps=None)
            start_run_folder(self.out, resolved, {
                "device": str(self.work.device), "world_size": self.plan.world_size,
                "accum_steps": self.plan.accum_steps, "model": self.work.kind,
                "task": self.work.task.name, "labels": self.work.labels,
                "train_samples": len(self.work.train),
                "val_samples": len(self.work.val),
                "parameters": num_parameters(self.work.model)}, data_fingerprint(self.config))

    def _lock_new(self) -> None:
        """Lock the new run's folder; another process may have started a run there meanwhile."""
        self.lock.acquire()
        if (self.out / "config.yaml").exists() and not self.config.checkpoint.overwrite:
            self.lock.release()
            check_out_dir(self.out, False)

    def _setup_logs(self) -> None:
        config = self.config
        params = {**config.flat(), "global_batch": self.plan.global_batch,
                  "micro_batch": self.plan.micro_batch, "accum_steps": self.plan.accum_steps,
                  "world_size": self.ranks.world_size}
        self.log = RunLog(self.out, config.checkpoint.log_to,
                          purge_step=self.step + 1 if self.resume else None, params=params,
                          resume=self.resume) if self.main else None
        self.progress = Progress(config.optim.steps, self.stream, start=self.step,
                                 unit=self.work.task.unit)
        for note in self.notes:
            self.progress.write(note)
        if config.runtime.on_oom != "stop" and not self.acc.oom_split:
            self.progress.write("note: out-of-memory splitting is off under FSDP2 (its state "
                                "cannot survive an out-of-memory error mid-backward)")
        for line in self._startup_lines():
            self.progress.write(line)

    def _startup_lines(self) -> list[str]:
        """The run that runs (see :mod:`.startup`): its batches, the noise scale, the data."""
        config, plan, schedule, world = self.config, self.plan, self.schedule, self.ranks.world_size
        self.shape = shape = RunShape(
            config.optim.steps, plan.global_batch, plan.micro_batch, world,
            config.runtime.parallel, f"{config.data.seq_len} "
            + ("bytes" if self.work.kind == "gpt" else "tokens"),
            self.packing.describe() if self.packing.mode != "none" else None)
        most_k = (plan.accum_steps if schedule is None else max(k for _, k in schedule.table)
                  if schedule.kind == "table" else max(schedule.k_final, schedule.k_max))
        lines = [f"training {num_parameters(self.work.model):,} parameters on {self.work.device}: "
                 + batch_line(shape, schedule, config.batch.accum_schedule, self.step),
                 noise_line(enabled=config.runtime.noise_scale, fsdp=self.fsdp,
                            most_micro_batches=2 if shape.packed else most_k * world),
                 *data_lines(len(self.work.train), len(self.work.val),
                             run_samples(shape, schedule), plan.global_batch)]
        note = precision_note(config.runtime.precision, torch.device(self.work.device))
        return lines + [note] if note else lines

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        config = self.config
        self.batches = global_batches(len(self.work.train), self.plan.global_batch,
                                      config.runtime.seed, start_step=self.step)
        self.tokens_per_sample = float(config.data.seq_len)  # refined from each step's count
        self.max_rows = self.acc.max_rows
        self.val_loss = math.nan
        self.skips = 0  # steps in a row skipped for a non-finite value (--max-skips)
        with StopSignals() as signals:
            while self.step < config.optim.steps and not (self.early and self.early.stopped):
                plan, micro_batches = self._micro_batches()
                try:
                    if self.work.task.whole_cycle:  # contrastive: the loss spans the cycle
                        stats = self.work.task.step(self.acc, micro_batches)
                    else:
                        self._accumulate(micro_batches, signals)
                        stats = self.acc.finish()
                except NonFiniteError as e:
                    path = self.checkpoints.save(self.step, 0)
                    raise RunStopped(f"stopped: {_flag_words(e)}. The last good state is in "
                                     f"{path}", 1) from e
                self.step += 1
                if self.schedule is not None:
                    self.schedule.took(len(micro_batches))
                self._report(stats, plan, len(micro_batches))
                self._count_skips(stats)
                self._between_steps(signals)
            if not self.checkpoints.exists(self.step, 0):
                self.checkpoints.save(self.step, 0)  # the clean stop

    def _count_skips(self, stats: StepStats) -> None:
        """``--max-skips``: stop, with a checkpoint, after that many steps in a row were skipped
        for a non-finite loss or gradient (a diverged run would otherwise skip to the end)."""
        self.skips = self.skips + 1 if stats.skip_reason in _NONFINITE else 0
        limit = self.config.runtime.max_skips
        if limit and self.skips >= limit:
            path = self.checkpoints.save(self.step, 0)
            raise RunStopped(
                f"stopped: {self.skips} optimizer steps in a row skipped (--on-nonfinite skip), "
                f"the --max-skips {limit} limit: the last, step {self.step}, had a "
                f"{stats.skip_reason}; the weights are from before them (checkpoint {path}). "
                "Lower --lr, check the data, or raise --max-skips (0: no limit)", 1)

    def _micro_batches(self) -> tuple[BatchPlan, list[Any]]:
        """This step's plan (K may follow a schedule) and this rank's micro-batches."""
        config, work, ranks, schedule = self.config, self.work, self.ranks, self.schedule
        if schedule is None:
            plan, rows = self.plan, next(self.batches)
        else:  # K of this step (a step resumed mid-cycle keeps the one it had)
            if self.first_micro == 0:
                schedule.next_k(self.step, self.noise.value / self.tokens_per_sample)
            plan = BatchPlan(micro_batch=self.plan.micro_batch, accum_steps=schedule.k,
                             world_size=ranks.world_size)
            rows = take_samples(len(work.train), config.runtime.seed, schedule.samples,
                                plan.global_batch)
            _scale_lr(self.opt, self.sched, lr_factor(config.batch.lr_scaling,
                                                      plan.global_batch, self.plan.global_batch))
        rows = rows[ranks.rank * plan.local_batch:(ranks.rank + 1) * plan.local_batch]
        if self.packing.mode == "none":
            return plan, plan.split(work.to_device(work.train.batch(rows)))
        # ≤ N tokens each, as --pack says; ranks evened out with empty ones
        packing = self.packing
        micro = packed_micro_batches(work.train, rows, packing.budget, work.device,
                                     mode=packing.mode, cost=packing.cost)
        if ranks.world_size > 1:
            micro = pad_micro_batches(micro, -ranks.smallest(-len(micro), self.comm))
        return plan, micro

    def _accumulate(self, micro_batches: list[Any], signals: StopSignals) -> None:
        """The step's micro-batches from where the run stands, checkpointing mid-cycle every
        ``--save-every-micro``; one process stops there on a signal."""
        k, every = len(micro_batches), self.config.checkpoint.save_every_micro
        done_before = (self.step * k if self.schedule is None
                       else self.schedule.samples // self.schedule.micro_samples)
        for i in range(self.first_micro, k):
            try:
                self.acc.accumulate(micro_batches[i], self.work.loss, last=i == k - 1)
            except OutOfMemory as e:
                self.acc.discard()
                if self.ranks.world_size > 1:
                    raise
                path = self.checkpoints.save(self.step, 0)
                raise RunStopped(f"stopped: {e}. The last good state is in {path}", 1) from e
            if signals.received and self.ranks.world_size == 1:  # ranks stop together,
                self._stop(signals.received, self.step, i + 1, k)  # between optimizer steps
            if every and (done_before + i + 1) % every == 0 and i + 1 < k:
                self.checkpoints.save(self.step, i + 1)  # every rank its own partial cycle
        self.first_micro = 0

    def _report(self, stats: StepStats, plan: BatchPlan, k: int) -> None:
        """Metrics line, progress, and the validation loss when it is due."""
        config, step = self.config, self.step
        if stats.count:
            self.tokens_per_sample = stats.count / plan.global_batch
        rows_note = _oom_note(stats, self.max_rows, step)
        if rows_note:
            self.progress.write(rows_note)
        self.max_rows = stats.max_rows
        b_noise = self.noise.update(stats.noise)
        tokens_per_s = stats.count / stats.seconds if stats.seconds > 0 else 0.0
        if self.log is not None:
            self.log.train(stats, step, tokens_per_s, {
                "global_batch": plan.global_batch, "accum_steps": k,
                "noise_scale": b_noise if math.isfinite(b_noise) else None,
                "noise_trace": None if stats.noise is None else stats.noise.trace,
                "noise_grad_sq": None if stats.noise is None else stats.noise.grad_sq,
                "oom_splits": stats.oom_splits, "max_rows": stats.max_rows})
        note = f" | skipped: {stats.skip_reason}" if stats.skipped else ""
        if math.isfinite(b_noise):
            note += f" | B_noise {b_noise:,.0f} {self.work.task.unit}"
        if self.schedule is not None or self.packing.mode != "none":
            note += f" | K {k}"
        self.progress.update(step, stats.loss, tokens_per_s, stats.lr, note)
        if step == config.optim.steps or (config.data.eval_every > 0
                                          and step % config.data.eval_every == 0):
            self._evaluate()

    def _evaluate(self) -> None:
        self.metrics = evaluate(self.work, self.config.data.eval_samples,
                                self.acc.max_rows or self.plan.micro_batch,
                                self.acc.precision.autocast)
        self.val_loss = self.metrics["val_loss"]
        if self.log is not None:
            self.log.eval(self.step, self.metrics)
        self.progress.write(f"step {self.step}: validation {describe(self.metrics, self.work)}")
        if self.early is not None:
            self._keep_best()

    def _keep_best(self) -> None:
        """``--early-stop``: count this evaluation; a new best's weights go to ``best/``."""
        assert self.early is not None
        if not self.early.update(self.val_loss, self.step):
            return
        weights = model_state(self.work.model, fsdp=True) if self.fsdp else None  # all ranks
        if self.main:
            model = final_model(self.work, self.config, weights)
            save_best(self.out, lambda folder: save_final(self.work, model, folder), self.step,
                      self.metrics)

    def _between_steps(self, signals: StopSignals) -> None:
        """Stop on a signal (all ranks together), or save when due."""
        stop = signals.received
        if self.ranks.world_size > 1 and not self.ranks.agree(stop is None, self.comm):
            stop = stop or signal.SIGTERM  # another rank was signalled
        if stop:
            self._stop(stop, self.step, 0, self.plan.accum_steps)
        every = self.config.checkpoint.save_every
        if every and self.step % every == 0 and self.step < self.config.optim.steps:
            self.checkpoints.save(self.step, 0)

    def _stop(self, signum: int, step: int, micro: int, k: int) -> NoReturn:
        path = self.checkpoints.save(step, micro)
        name, world = signal.Signals(signum).name, self.ranks.world_size
        how = (f"torchrun --nproc-per-node {world} -m bigbatch train" if world > 1
               else "bigbatch train")
        raise RunStopped(
            f"stopped by {name} at step {step}, micro-batch {micro}/{k}; checkpoint {path}; "
            f"resume with: {how} --resume {self.out.absolute()}", 128 + signum)

    # -- the end -------------------------------------------------------------------------------

    def _finish(self, seconds: float) -> TrainResult:
        config, plan, main = self.config, self.plan, self.main
        if math.isnan(self.val_loss):  # resumed after the last step: report the weights anyway
            self.metrics = evaluate(self.work, config.data.eval_samples,
                                    self.acc.max_rows or plan.micro_batch,
                                    self.acc.precision.autocast)
            self.val_loss = self.metrics["val_loss"]
        weights = model_state(self.work.model, fsdp=True) if self.fsdp else None  # all ranks
        metrics = self.out / "metrics.jsonl"
        if main:
            self._final_notes(metrics)
            final = final_model(self.work, config, weights)
            samples = (sample_completions(self.work, final, config.runtime.seed)
                       if math.isfinite(self.val_loss) else [])  # NaN weights cannot sample
            if samples:
                write_samples(self.out / "samples.md", samples)
                for prompt, completion in samples[:2]:
                    self.progress.write(f"sample: {_short(prompt)!r} → {_short(completion)!r}")
                self.progress.write(f"sampled completions: {self.out / 'samples.md'}")
            cut = (f"{plan.global_batch:,}, {self.shape.packed}" if self.shape.packed
                   else self.shape.cut(plan.accum_steps)
                   + (", K by --accum-schedule" if self.schedule is not None else ""))
            plot_losses(metrics, self.out / "loss.png", title=f"bigbatch train: global batch {cut}")
            # the model last: a folder with it is a finished run (see runfolder.is_finished)
            self.progress.write(f"trained model: {save_final(self.work, final, self.out)}")
        self.ranks.agree(True, self.comm)  # rank 0 wrote the run's files before anyone returns
        return TrainResult(out=self.out, steps=self.step, main=main,
                           final_train_loss=last_train_loss(metrics) if main else math.nan,
                           final_val_loss=self.val_loss, seconds=seconds,
                           final_metrics=describe(self.metrics, self.work))

    def _final_notes(self, metrics: Path) -> None:
        """The early-stopping line, and the final metrics to the trackers (rank 0)."""
        steps, early = self.config.optim.steps, self.early
        final: dict[str, Any] = {**self.metrics, "train_loss": last_train_loss(metrics),
                                 "steps": self.step}
        if early is not None:
            if early.stopped and self.step < steps:
                self.progress.write(early.note(self.step, steps))
            elif early.best_step:
                self.progress.write(f"best validation loss {early.best_loss:.4f} at step "
                                    f"{early.best_step}, its weights in {self.out / 'best'}")
            else:
                self.progress.write("no evaluation gave a finite validation loss: no best/")
            final.update(best_step=early.best_step, best_val_loss=early.best_loss)
        if self.log is not None:
            self.log.final(final)


def _flag_words(error: NonFiniteError) -> str:
    """The engine's message in the words of the command line (the flags a user types)."""
    return (str(error).replace("(on_nonfinite='skip')", "(--on-nonfinite skip)")
            .replace("Lower the learning rate", "Lower --lr"))


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else "…" + text[-width:]


def describe(metrics: dict[str, float], work: Workload) -> str:
    """``loss 1.8886 (uniform 5.55), accuracy 0.91`` for the log."""
    parts = [f"loss {metrics['val_loss']:.4f}"]
    if work.task.name == "causal-lm" and work.tokenizer is not None:
        parts[0] += f" (uniform {math.log(work.tokenizer.vocab_size):.2f})"
    parts += [f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()
              if k not in ("val_loss", "val_items")]
    return ", ".join(parts)


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


def _scale_lr(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
              factor: float) -> None:
    """Set each group's learning rate to the schedule's value × ``factor`` for this step (the
    scheduler recomputes its own value from the step count, so factors never compound)."""
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group["lr"] = lr * factor
