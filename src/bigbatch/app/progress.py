"""Progress display counted in optimizer steps: a live bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from tqdm import tqdm

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, s = divmod(seconds, 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _terminal_width(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` writes to; 0 when it is not a (sized) terminal."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):
        return 0


class Progress:
    """Shows optimizer steps done out of ``total``, with loss, tokens/s, learning rate and ETA.

    On a terminal this is a tqdm bar updated every step. When ``stream`` is not a terminal (a log
    file, CI, a pipe) it prints one plain line every ``every`` steps (default: about 20 lines per
    run) and on the last step.

    Args:
        total: optimizer steps in the run.
        stream: where to write (default ``sys.stderr``).
        unit: what the loss counts, per second (``tok``, ``samples``, ``pairs``).
        every: plain-line period in steps (ignored on a terminal).
        start: steps already done (a resumed run).
    """

    def __init__(self, total: int, stream: TextIO | None = None, every: int | None = None,
                 start: int = 0, unit: str = "tok") -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.every = every or max(1, total // 20)
        self.start_step = start
        self.unit = unit  # what the loss counts: tokens, samples, pairs
        self._t0 = time.perf_counter()
        self._bar: tqdm | None = None
        if _terminal_width(self.stream) > 0:
            self._bar = tqdm(total=total, initial=start, file=self.stream, unit="step",
                             dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float,
               note: str = "") -> None:
        """Report that optimizer step ``step`` (1-based) finished."""
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"loss {loss:.4f} | {tokens_per_s:,.0f} {self.unit}/s | lr {lr:.2e}{note}",
                refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        self.stream.write(
            f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} {self.unit}/s  "
            f"lr {lr:.2e}  eta {_duration(eta)}{note}\n"
        )
        self.stream.flush()

    def write(self, line: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
