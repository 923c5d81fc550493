"""What a run writes: ``metrics.jsonl`` (plus TensorBoard events when installed), the loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..engine import StepStats

__all__ = ["RunLog", "last_train_loss", "plot_losses", "read_metrics"]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN; null marks "not computed"


def _tensorboard_without_tensorflow() -> None:
    """Event files need no TensorFlow, but TensorBoard imports it whenever it is installed
    (seconds, and its logging) unless ``tensorboard.compat.notf`` exists — TensorBoard's own switch
    to its TensorFlow stub. Set that switch, unless TensorFlow is already loaded."""
    import sys
    import types

    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))


class RunLog:
    """Appends one JSON line per optimizer step and per evaluation to ``metrics.jsonl``.

    Train lines: ``{"kind": "train", "step", "loss", "items", "grad_norm", "lr", "tokens_per_s",
    "seconds", "skipped", "skip_reason", "micro_batches"}``. Eval lines: ``{"kind": "eval",
    "step", "val_loss", "val_items"}`` and the task's metrics (``accuracy``; ``recall_at_1``,
    ``mrr``). With the ``tensorboard`` extra installed the same scalars go
    to TensorBoard event files in ``tb/``.
    """

    def __init__(self, out: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb: Any = None
        if tensorboard:
            try:
                _tensorboard_without_tensorflow()
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the extra is not installed: metrics.jsonl only
                pass
            else:
                # purge_step drops events a resumed run is about to write again
                self._tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=purge_step)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

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
        if self._tb is not None:
            scalars = [("train/loss", stats.loss), ("train/grad_norm", stats.grad_norm),
                       ("train/lr", stats.lr), ("train/tokens_per_s", tokens_per_s)]
            scalars += [(f"train/{k}", v) for k, v in extra.items()
                        if isinstance(v, (int, float))]
            for key, value in scalars:
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        """One eval line: ``val_loss``, ``val_items`` and the task's metrics (accuracy, …)."""
        record = {k: v if isinstance(v, int) else _finite(v) for k, v in metrics.items()}
        self._write({"kind": "eval", "step": step, **record})
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "val_items" and math.isfinite(value):
                    self._tb.add_scalar("val/loss" if key == "val_loss" else f"val/{key}",
                                        value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


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
