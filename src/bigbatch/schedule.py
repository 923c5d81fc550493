"""Batch-size schedules through K: the micro-batch stays, the number of micro-batches changes.

``--accum-schedule`` takes one of

* a step table ``"0:4,500:8,2000:16"``: K = 4 from step 0, 8 from step 500, 16 from step 2000;
* ``"ramp:START:SAMPLES"``: the global batch grows linearly from START samples to the configured
  global batch over the first SAMPLES training samples (as Megatron's batch-size ramp-up), rounded
  down to a whole number of micro-batches on every rank;
* ``"adaptive:KMIN:KMAX:EVERY"``: K follows the smoothed gradient noise scale ``B_simple`` (see
  :mod:`bigbatch.noise`): the global batch closest to ``B_simple`` (converted from items to
  samples), within ``[KMIN, KMAX]``, changed at most every EVERY steps. KMIN is at least 2: the
  noise scale is measured from the spread of a step's micro-batch gradients, so a step of one
  micro-batch measures nothing and K would stay at 1 for good.

The learning-rate schedule stays keyed on optimizer steps; :func:`lr_factor` gives the optional
batch-size scaling (``linear``: ∝ global batch, ``sqrt``: ∝ √global batch) relative to the
configured global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import BigBatchError

__all__ = ["AccumSchedule", "ScheduleError", "lr_factor", "parse_accum_schedule"]


class ScheduleError(BigBatchError):
    """An ``--accum-schedule`` or ``--lr-scaling`` value that cannot be used."""


@dataclass
class AccumSchedule:
    """K for each optimizer step, and the state needed to resume it exactly.

    Attributes:
        kind: ``"table"``, ``"ramp"`` or ``"adaptive"``.
        micro_samples: samples per micro-batch over all ranks (``micro_batch × world_size``).
        k: K of the step about to run.
        samples: training samples consumed by the steps taken so far.
        last_change: step at which K last changed (adaptive).
    """

    kind: str
    micro_samples: int
    table: tuple[tuple[int, int], ...] = ()
    ramp_start: int = 0
    ramp_samples: int = 0
    k_final: int = 1
    k_min: int = 1
    k_max: int = 1
    every: int = 1
    k: int = 1
    samples: int = 0
    last_change: int = 0

    def next_k(self, step: int, noise_scale_samples: float = math.nan) -> int:
        """K for optimizer step ``step`` (0-based); call once per step, before it runs.

        Args:
            step: the step about to run.
            noise_scale_samples: the smoothed ``B_simple`` in samples (adaptive only; NaN while
                unknown keeps K).
        """
        if self.kind == "table":
            k = self.table[0][1]
            for start, value in self.table:
                if step >= start:
                    k = value
        elif self.kind == "ramp":
            frac = min(1.0, self.samples / self.ramp_samples) if self.ramp_samples else 1.0
            target = self.ramp_start + frac * (self.k_final * self.micro_samples - self.ramp_start)
            k = max(1, min(self.k_final, int(target // self.micro_samples)))
        else:
            k = self.k
            if math.isfinite(noise_scale_samples) and step - self.last_change >= self.every:
                want = round(noise_scale_samples / self.micro_samples)
                k = max(self.k_min, min(self.k_max, want))
        if k != self.k:
            self.last_change = step
        self.k = k
        return k

    def took(self, k: int) -> None:
        """Record a finished step of K micro-batches (its samples are consumed)."""
        self.samples += k * self.micro_samples

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "samples": self.samples, "last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.k, self.samples = int(state["k"]), int(state["samples"])
        self.last_change = int(state["last_change"])


def parse_accum_schedule(spec: str, *, micro_batch: int, world_size: int,
                         k_final: int) -> AccumSchedule:
    """Build the schedule ``spec`` describes (see the module docstring).

    Args:
        spec: the ``--accum-schedule`` value.
        micro_batch: samples per micro-batch on one rank.
        world_size: data-parallel ranks.
        k_final: K of the configured global batch (the ramp's end; adaptive's starting K).

    Raises:
        ScheduleError: the spec is malformed; the message shows the accepted forms.
    """
    forms = ("use a step table like '0:4,500:8', 'ramp:START_SAMPLES:OVER_SAMPLES' or "
             "'adaptive:KMIN:KMAX:EVERY_STEPS'")
    micro_samples = micro_batch * world_size
    head, _, rest = spec.partition(":")
    try:
        if head == "ramp":
            start, over = (int(v) for v in rest.split(":"))
            if not 1 <= start <= k_final * micro_samples or over < 1:
                raise ScheduleError(
                    f"--accum-schedule {spec}: START must be 1..{k_final * micro_samples} (the "
                    "global batch) and OVER at least 1")
            return AccumSchedule("ramp", micro_samples, ramp_start=start, ramp_samples=over,
                                 k_final=k_final, k=max(1, start // micro_samples))
        if head == "adaptive":
            k_min, k_max, every = (int(v) for v in rest.split(":"))
            if k_min < 2:  # one micro-batch measures no noise scale: K would freeze there
                raise ScheduleError(
                    f"--accum-schedule {spec}: KMIN must be at least 2, since the noise scale "
                    "that steers K is measured across a step's micro-batches and K=1 would "
                    f"never measure it again; give adaptive:2:{max(k_max, 2)}:{every}")
            if not k_min <= k_max or every < 1:
                raise ScheduleError(f"--accum-schedule {spec}: need 2 <= KMIN <= KMAX and "
                                    "EVERY >= 1")
            return AccumSchedule("adaptive", micro_samples, k_min=k_min, k_max=k_max,
                                 every=every, k=max(k_min, min(k_max, k_final)))
        table = tuple((int(a), int(b)) for a, b in (item.split(":") for item in spec.split(",")))
    except ScheduleError:
        raise  # (a ValueError too) already says what is wrong
    except ValueError:
        raise ScheduleError(f"--accum-schedule {spec!r} is not understood; {forms}") from None
    steps = [s for s, _ in table]
    if steps[0] != 0 or steps != sorted(set(steps)) or any(k < 1 for _, k in table):
        raise ScheduleError(f"--accum-schedule {spec}: the table must start at step 0, with "
                            "increasing steps and K >= 1, e.g. '0:4,500:8,2000:16'")
    return AccumSchedule("table", micro_samples, table=table, k=table[0][1])


def lr_factor(rule: str, global_batch: int, base_global_batch: int) -> float:
    """The learning-rate multiplier for ``global_batch`` under ``rule``.

    Raises:
        ScheduleError: an unknown rule.
    """
    ratio = global_batch / base_global_batch
    if rule == "none":
        return 1.0
    if rule == "linear":
        return ratio
    if rule == "sqrt":
        return math.sqrt(ratio)
    raise ScheduleError(f"--lr-scaling {rule!r}: use none, linear or sqrt")
