"""``bigbatch compare``: full batch, bigbatch accumulation and the naive recipe, side by side.

The same model (same initialization) trains three times on the same padded, variable-length global
batches: in one plain PyTorch step per global batch (the truth, with no bigbatch code in the step:
mean cross-entropy over the batch's real tokens, ``backward``, ``clip_grad_norm_``, ``step``), with
K micro-batches normalized by the true token count (bigbatch), and with K micro-batches each
normalized by its own token mean and divided by K (the recipe the popular trainers used until
2024). The first two end at the same weights up to float rounding; the third drifts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..engine import Accumulator
from ..loss import IGNORE_INDEX, LossSum
from ..plan import BatchPlan
from ..verify import naive_loss
from .config import TrainConfig
from .data import global_batches, vary_lengths
from .workload import build_workload, lm_loss, make_optimizer, make_scheduler

__all__ = ["CompareResult", "compare", "format_compare"]

RUNS = ("full batch", "bigbatch", "naive")


@dataclass(frozen=True)
class CompareResult:
    """Per-run true training losses, final distances to the full-batch run, and the plot."""

    losses: dict[str, list[float]]
    distance: dict[str, float]
    k: int
    global_batch: int
    steps: int
    png: Path


class _TrueLoss:
    """Wraps a loss function and records the exact Σ sum / Σ count of what it saw."""

    def __init__(self, loss_fn: Callable[[torch.nn.Module, Any], LossSum]) -> None:
        self.loss_fn = loss_fn
        self.sum: Any = 0.0
        self.count: Any = 0

    def __call__(self, model: torch.nn.Module, batch: Any) -> LossSum:
        ls = self.loss_fn(model, batch)
        # Kept as (device) tensors: read once per step in take(), not once per micro-batch.
        self.sum = self.sum + ls.sum.detach().double()
        self.count = self.count + ls.count
        return ls

    def take(self) -> float:
        """The exact mean since the last call, ``Σ sum / Σ count`` (NaN with no items)."""
        total, count = float(self.sum), int(self.count)
        self.sum, self.count = 0.0, 0
        return total / count if count else float("nan")


def _distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(torch.cat([(p - q).double().flatten()
                                for p, q in zip(a.parameters(), b.parameters())]).norm())


def compare(config: TrainConfig, *, steps: int, accum_steps: int, out_png: Path,
            log: Callable[[str], None] = print) -> CompareResult:
    """Train the three runs for ``steps`` optimizer steps and plot their loss curves.

    Distances are relative: ``‖θ_run − θ_full‖ / ‖θ_full − θ_0‖`` — how far a run ended from the
    full-batch weights, compared with how far training moved them (L2 over all parameters).

    Args:
        config: the workload (model, data, optimizer, schedule, clip, precision, seed).
        steps: optimizer steps per run (40 take ~45 s on 2 CPU cores with the default config).
        accum_steps: K for the bigbatch and naive runs; must divide the global batch.
        out_png: where the plot is written.
        log: receives one progress line per finished run.

    Returns:
        :class:`CompareResult`; each loss is the exact token mean of that step's global batch, for
        the naive run too (recorded beside the engine, not taken from its mean-of-means stats).

    Raises:
        BatchPlanError: the global batch is not divisible into ``accum_steps`` micro-batches.
        ConfigError, DataError: the device or the data cannot be had.
    """
    g = config.plan().global_batch
    plan = BatchPlan(global_batch=g, accum_steps=accum_steps, world_size=1)
    work = build_workload(config)
    start = copy.deepcopy(work.model)
    order = global_batches(len(work.train), g, config.runtime.seed)
    batches = [vary_lengths(work.train.batch(next(order)), config.runtime.seed, step)
               for step in range(steps)]
    losses: dict[str, list[float]] = {}
    models: dict[str, torch.nn.Module] = {}
    for name in RUNS:
        model = copy.deepcopy(start)
        if name == "full batch":
            losses[name] = _full_batch(model, config, map(work.to_device, batches))
            models[name] = model
            log(f"{name}: K=1, final training loss {losses[name][-1]:.4f}")
            continue
        opt = make_optimizer(model, config)
        acc = Accumulator(model, opt, scheduler=make_scheduler(opt, config),
                          clip_grad_norm=config.optim.clip_norm,
                          precision=config.runtime.precision)  # type: ignore[arg-type]
        true_loss = _TrueLoss(lm_loss)
        loss_fn = naive_loss(true_loss) if name == "naive" else true_loss
        curve = []
        for batch in batches:
            acc.step(plan.split(work.to_device(batch)), loss_fn)
            curve.append(true_loss.take())
        losses[name], models[name] = curve, model
        log(f"{name}: K={accum_steps}, final training loss {curve[-1]:.4f}")
    moved = _distance(models["full batch"], start)
    distance = {name: _distance(models[name], models["full batch"]) / moved for name in RUNS}
    result = CompareResult(losses, distance, accum_steps, g, steps, out_png)
    _plot(result)
    return result


def _full_batch(model: torch.nn.Module, config: TrainConfig, batches: Any) -> list[float]:
    """The reference arm in plain PyTorch (no bigbatch code in the step): per global batch, the
    mean cross-entropy over its real tokens, one backward, ``clip_grad_norm_``, one optimizer and
    scheduler step. Returns each step's loss, measured before its update."""
    opt, clip = make_optimizer(model, config), config.optim.clip_norm
    sched = make_scheduler(opt, config)
    device = next(model.parameters()).device
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.runtime.precision)
    scaler = torch.amp.GradScaler(device.type) if config.runtime.precision == "fp16" else None
    curve = []
    for batch in batches:
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            logits = model(batch["input_ids"])
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        loss = F.cross_entropy(logits.flatten(0, -2), batch["labels"].flatten(),
                               ignore_index=IGNORE_INDEX)
        curve.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler:
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() < scale:  # an overflow skipped the step: not the scheduler
                continue
        else:
            opt.step()
        sched.step()
    return curve


def _plot(result: CompareResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = range(1, result.steps + 1)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    # bigbatch is drawn last and dashed, so the full-batch line shows through where they agree.
    (full,) = ax.plot(steps, result.losses["full batch"], color="black", lw=2.5,
                      label="full batch (K=1)")
    (naive,) = ax.plot(steps, result.losses["naive"], color="tab:red", lw=1.2,
                       label=f"naive (K={result.k}, mean of micro-batch means)")
    (exact,) = ax.plot(steps, result.losses["bigbatch"], color="tab:cyan", lw=1.2, ls="--",
                       label=f"bigbatch (K={result.k}, Σsum/Σcount)")
    text = "\n".join(f"{name}: {result.distance[name]:.1e}" for name in RUNS[1:])
    ax.text(0.98, 0.70, "distance from full-batch weights\n(relative to distance trained)\n"
            + text, transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no "2.5"
    ax.set_ylabel("training loss (exact token mean)")
    ax.set_title(f"global batch {result.global_batch}: full batch vs K={result.k} micro-batches "
                 "(padded, variable-length sequences)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=[full, exact, naive], loc="upper right")
    fig.tight_layout()
    fig.savefig(result.png)
    plt.close(fig)


def format_compare(result: CompareResult) -> str:
    """A markdown table: run, K, final training loss, relative distance to the full batch."""
    lines = ["| run | K | final training loss | distance to full batch |", "|---|---|---|---|"]
    for name in RUNS:
        k = 1 if name == "full batch" else result.k
        lines.append(f"| {name} | {k} | {result.losses[name][-1]:.4f} | "
                     f"{result.distance[name]:.2e} |")
    return "\n".join(lines)
