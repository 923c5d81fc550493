"""``--early-stop PATIENCE``: stop when the validation loss stops improving, keeping the best.

The state is a few numbers — the best validation loss, the step it was measured at, and how many
evaluations have passed since without beating it — saved with every checkpoint (an extra of
:class:`~bigbatch.app.checkpointer.Checkpointer`), so a resumed run stops at the step an
uninterrupted one stops at. The best weights themselves go to ``best/`` in the run folder
(:func:`save_best`), with ``best/best.json`` saying which step and loss they are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["BEST", "EarlyStopping", "save_best"]

BEST = "best"  # the folder in the run folder


@dataclass
class EarlyStopping:
    """Counts evaluations without a new best validation loss.

    ``patience`` evaluations in a row that do not beat the best loss (strictly lower; NaN never
    does) set :attr:`stopped`.
    """

    patience: int
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one

    def update(self, val_loss: float, step: int) -> bool:
        """Count the evaluation at ``step``; returns True when it is a new best."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = val_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def stopped(self) -> bool:
        return self.bad_evals >= self.patience

    def note(self, step: int, steps: int) -> str:
        """The one line a run that stopped early ends with."""
        return (f"early stop at step {step} of {steps}: the validation loss has not improved for "
                f"{self.bad_evals} evaluations; best step {self.best_step} (validation loss "
                f"{self.best_loss:.4f}), its weights in {BEST}/")

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_step, self.bad_evals = int(state["best_step"]), int(state["bad_evals"])


def save_best(out: Path, write: Any, step: int, metrics: dict[str, float]) -> Path:
    """Replace ``out/best`` with the weights ``write(folder)`` writes and ``best.json`` (the step
    and the validation metrics); built aside and moved in, so ``best/`` is always whole."""
    target, tmp, old = out / BEST, out / f".{BEST}.tmp-{os.getpid()}", out / f".{BEST}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    (tmp / "best.json").write_text(json.dumps({"step": step, **metrics}, indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target
