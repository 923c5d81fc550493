"""What ``bigbatch train`` says before its first step: the run that will run, in its own numbers.

The header describes the batches the steps will actually take — K of the first step under an
``--accum-schedule`` (a ramp starts small), the per-rank cut under ``torchrun`` — then whether the
gradient noise scale is measured, how many epochs of the training data the run amounts to, and
notes for settings that run but surprise (data smaller than one global batch, bf16 without fast
bf16 on the device).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ..schedule import AccumSchedule

__all__ = ["RunShape", "batch_line", "data_lines", "fast_bf16", "noise_line", "plural",
           "precision_note", "run_samples"]


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 step``, ``2 steps``; ``1 micro-batch``, ``1,024 micro-batches`` (``words``: the
    plural, when it is not ``word`` + s)."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


@dataclass(frozen=True)
class RunShape:
    """The sizes the header speaks of.

    Attributes:
        steps: optimizer steps of the run.
        global_batch: the configured global batch (samples, all ranks).
        micro_batch: samples per micro-batch on one rank.
        world_size: data-parallel ranks.
        parallel: ``ddp`` or ``fsdp2`` (under torchrun).
        sample: what one sample is, e.g. ``128 bytes``.
        packed: how ``--pack`` cuts each global batch (K then follows the lengths), e.g.
            ``packed into padding-free rows, at most 1,024 tokens per micro-batch``; None: by
            ``micro_batch`` samples.
    """

    steps: int
    global_batch: int
    micro_batch: int
    world_size: int
    parallel: str
    sample: str
    packed: str | None = None

    def cut(self, k: int, *, sizes: bool = True) -> str:
        """``32 = 4 micro-batches of 8 × 128 bytes`` (per rank × N ranks under torchrun)."""
        g = k * self.micro_batch * self.world_size
        text = f"{g:,} = {plural(k, 'micro-batch', 'micro-batches')}"
        if sizes:
            text += f" of {self.micro_batch:,} × {self.sample}"
        if self.world_size > 1:
            text += f" per rank × {self.world_size} ranks"
        return text


def batch_line(shape: RunShape, schedule: AccumSchedule | None, spec: str | None,
               step: int = 0) -> str:
    """What each step's batch is, from step ``step`` on (``step`` > 0: a resumed run).

    Args:
        shape: the run's sizes.
        schedule: the K schedule (its state as loaded), or None for a fixed K.
        spec: the ``--accum-schedule`` text, named at the end.
        step: the next step to run.
    """
    steps = plural(shape.steps, "step")
    where = f" ({shape.parallel})" if shape.world_size > 1 else ""
    if shape.packed:
        per_rank = (f" ({shape.global_batch // shape.world_size:,} per rank × "
                    f"{shape.world_size} ranks{where})" if shape.world_size > 1 else "")
        return f"{steps} of global batch {shape.global_batch:,}{per_rank}, {shape.packed}"
    if schedule is None:
        k = shape.global_batch // (shape.micro_batch * shape.world_size)
        return f"{steps} of global batch {shape.cut(k)}{where}"
    first = copy.copy(schedule).next_k(step)  # the next step's K, the schedule left as it is
    when = "at the start" if step == 0 else f"at step {step + 1}"
    named = " (" + "; ".join(filter(None, (where[2:-1], spec and f"--accum-schedule {spec}")))
    named = "" if named == " (" else named + ")"  # "(ddp; --accum-schedule 0:4,500:8)"
    if schedule.kind == "table":  # its steps are counted 0-based: "500:8" is after 500 steps
        parts = [shape.cut(k, sizes=i == 0) + (f" after {plural(start, 'step')}" if start else "")
                 for i, (start, k) in enumerate(schedule.table)]
        return f"{steps}; global batch {', then '.join(parts)}{named}"
    if schedule.kind == "ramp":
        return (f"{steps}; global batch {shape.cut(first)} {when}, ramped up to "
                f"{shape.cut(schedule.k_final, sizes=False)} over the first "
                f"{plural(schedule.ramp_samples, 'sample')}{named}")
    lo, hi = (k * shape.micro_batch * shape.world_size for k in (schedule.k_min, schedule.k_max))
    every = "every step" if schedule.every == 1 else f"every {schedule.every} steps"
    return (f"{steps}; global batch {shape.cut(first)} {when}, then K from {schedule.k_min} to "
            f"{schedule.k_max} (global batch {lo:,} to {hi:,}) following the noise scale, "
            f"changed at most {every}{named}")


def noise_line(*, enabled: bool, fsdp: bool, most_micro_batches: int) -> str:
    """Whether the gradient noise scale is measured, and if not, why.

    Args:
        enabled: ``--noise-scale`` (the default).
        fsdp: the model is sharded with FSDP2 over several ranks.
        most_micro_batches: the most micro-batches any step takes over all ranks (K × ranks).
    """
    if not enabled:
        return "noise scale: off (--no-noise-scale)"
    if fsdp:
        return ("noise scale: not measured under FSDP2 (its sharding hides each rank's "
                "micro-batch gradient); --parallel ddp measures it")
    if most_micro_batches < 2:
        return ("noise scale: not measured (it needs 2 or more micro-batches per step, over all "
                "ranks; this run takes 1)")
    return "noise scale: measured every step (B_noise on the progress line, in metrics.jsonl)"


def data_lines(train_samples: int, val_samples: int, run_samples: tuple[int, int],
               global_batch: int) -> list[str]:
    """How much of the training data the run reads, and a warning when one global batch is
    more than all of it (each step then repeats samples).

    Args:
        train_samples: samples in the training split.
        val_samples: samples in the validation split.
        run_samples: the fewest and the most samples the run's steps take (equal unless K
            follows the noise scale).
        global_batch: the configured global batch.
    """
    lo, hi = (_epochs(n / train_samples) for n in run_samples)
    amount = (f"{run_samples[0]:,} samples = {lo} epoch{'' if lo == '1' else 's'}"
              if run_samples[0] == run_samples[1] else
              f"{run_samples[0]:,} to {run_samples[1]:,} samples = {lo} to {hi} epochs")
    lines = [f"data: {plural(train_samples, 'training sample')}, {val_samples:,} for validation; "
             f"the run takes {amount}"]
    if train_samples < global_batch:
        lines.append(f"warning: the training data holds {plural(train_samples, 'sample')}, "
                     f"fewer than one global batch ({global_batch:,}): every step repeats "
                     "samples; give more data or a smaller --global-batch")
    return lines


def _epochs(e: float) -> str:
    """Three significant digits, whole numbers from 100 (``0.000282``, ``2.83``, ``4,267``)."""
    return f"{e:.3g}" if e < 99.5 else f"{e:,.0f}"


def run_samples(shape: RunShape, schedule: AccumSchedule | None) -> tuple[int, int]:
    """The fewest and the most training samples the whole run takes (from step 0)."""
    micro_samples = shape.micro_batch * shape.world_size
    if schedule is None:
        return (shape.steps * shape.global_batch,) * 2
    if schedule.kind == "adaptive":
        return (shape.steps * schedule.k_min * micro_samples,
                shape.steps * schedule.k_max * micro_samples)
    fresh = copy.copy(schedule)
    fresh.samples, fresh.k, fresh.last_change = 0, 1, 0
    for step in range(shape.steps):
        fresh.took(fresh.next_k(step))
    return (fresh.samples,) * 2


def precision_note(precision: str, device: torch.device) -> str | None:
    """A note when ``--precision bf16`` runs on a device without fast bfloat16 math (None else).

    A CPU without AVX512-BF16 or AMX emulates bfloat16: autocast then runs many times slower than
    float32 (about 14× on an AVX2 laptop CPU).
    """
    if precision != "bf16" or fast_bf16(device) is not False:
        return None
    if device.type == "cpu":
        return ("note: this CPU has no fast bfloat16 (no AVX512-BF16 or AMX), so --precision "
                "bf16 is emulated and runs several times slower than --precision fp32 (about "
                "14× on an AVX2 CPU); prefer fp32 here")
    return (f"note: {device} has no fast bfloat16 (tensor cores need compute capability 8.0 or "
            "newer), so --precision bf16 runs slower than fp32 or fp16 here")


def fast_bf16(device: torch.device) -> bool | None:
    """Whether ``device`` has fast bfloat16 math; None when it cannot be told."""
    if device.type == "cpu":
        flags = _cpu_flags()
        if flags is None:
            return None
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512/AMX; Arm BF16
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return None


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux); None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return frozenset(flags) if flags else None
