"""What a run writes: ``metrics.jsonl`` (and the trackers of ``--log-to``), the loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..engine import StepStats
from .tracking import numeric, open_trackers

__all__ = ["RunLog", "last_train_loss", "plot_losses", "read_metrics"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN; null marks "not computed"


class RunLog:
    """Appends one JSON line per optimizer step and per evaluation to ``metrics.jsonl``, and
    sends the same numbers to the trackers ``--log-to`` names (:mod:`.tracking`).

    Train lines: ``{"kind": "train", "step", "loss", "items", "grad_norm", "lr", "tokens_per_s",
    "seconds", "skipped", "skip_reason", "micro_batches"}``. Eval lines: ``{"kind": "eval",
    "step", "val_loss", "val_items"}`` and the task's metrics (``accuracy``; ``recall_at_1``,
    ``mrr``). Trackers get each line's finite numbers as ``train/<key>`` (``val/loss``,
    ``val/<key>``) at its step, ``params`` once, and :meth:`final`'s values.

    Raises:
        TrackerError: a tracker ``log_to`` names is not installed or cannot be opened.
    """

    def __init__(self, out: Path, log_to: str = "auto", purge_step: int | None = None,
                 params: dict[str, Any] | None = None, resume: bool = False) -> None:
        self.path = out / "metrics.jsonl"
        self._trackers = open_trackers(log_to, out, params or {}, purge_step=purge_step,
                                       resume=resume)
        self._file = self.path.open("a", encoding="utf-8")
        self._step = 0

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._step = record["step"]
        prefix = "train/" if record["kind"] == "train" else "val/"
        scalars = numeric(record, prefix)
        if "val/val_loss" in scalars:
            scalars["val/loss"] = scalars.pop("val/val_loss")
        for tracker in self._trackers:
            tracker.scalars(scalars, record["step"])

    def train(self, stats: StepStats, step: int, tokens_per_s: float,
              extra: dict[str, Any] | None = None) -> None:
        """One train line; ``extra`` adds keys (the trainer's ``global_batch``, ``accum_steps``
        and the smoothed ``noise_scale`` in tokens, with the step's raw ``noise_trace`` and
        ``noise_grad_sq``)."""
        extra = extra or {}
        self._write({
            "kind": "train", "step": step, "loss": _finite(stats.loss), "items": stats.count,
            "grad_norm": _finite(stats.grad_norm), "lr": stats.lr,
            "tokens_per_s": tokens_per_s, "seconds": stats.seconds, "skipped": stats.skipped,
            "skip_reason": stats.skip_reason, "micro_batches": stats.micro_batches, **extra,
        })

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        """One eval line: ``val_loss``, ``val_items`` and the task's metrics (accuracy, …)."""
        record = {k: v if isinstance(v, int) else _finite(v) for k, v in metrics.items()}
        self._write({"kind": "eval", "step": step, **record})

    def final(self, metrics: dict[str, Any]) -> None:
        """The run's final metrics, to the trackers only (``final/<key>``, at the last step)."""
        values = numeric(metrics, "")
        for tracker in self._trackers:
            tracker.final(values, self._step)

    def close(self, ok: bool = True) -> None:
        """Close the file and the trackers (``ok``: the run finished; else it stopped)."""
        self._file.close()
        for tracker in self._trackers:
            tracker.close(ok)
        self._trackers = []


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def last_train_loss(metrics: Path) -> float:
    """The last training loss in a ``metrics.jsonl`` (NaN when there is none)."""
    losses = [r["loss"] for r in read_metrics(metrics) if r["kind"] == "train"]
    return losses[-1] if losses and losses[-1] is not None else math.nan


def plot_losses(metrics: Path, png: Path, title: str = "") -> Path:
    """Training loss per optimizer step and validation loss per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in records
             if r["kind"] == "train" and r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in records
           if r["kind"] == "eval" and r["val_loss"] is not None]
    noise = [(r["step"], r["noise_scale"]) for r in records
             if r["kind"] == "train" and r.get("noise_scale") is not None]
    if noise:  # a second panel: the smoothed gradient noise scale (and the batch, if it moved)
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6.4), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
        ax2.plot(*zip(*noise), color="tab:green", lw=1.2, label="B_simple (smoothed)")
        batch = [(r["step"], r["items"]) for r in records
                 if r["kind"] == "train" and r.get("items")]
        if batch:
            ax2.plot(*zip(*batch), color="0.5", lw=1, ls="--", label="tokens per step (batch)")
        ax2.set_yscale("log")
        ax2.set_ylabel("tokens")
        ax2.set_xlabel("optimizer step")
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=1.0, color="tab:blue", label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation loss")
    ax.axhline(math.log(256), color="grey", ls=":", lw=1, label="uniform over 256 bytes")
    if not noise:
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or "bigbatch train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
