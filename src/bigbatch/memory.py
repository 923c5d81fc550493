"""Memory: how many bytes a training step holds, and what to do when it holds too many.

A step's peak memory is, to a good approximation, linear in the micro-batch size ``m``::

    peak(m) = fixed + per_sample · m

``fixed`` holds the parameters, their gradients, the optimizer state and whatever else the process
already has; ``per_sample`` is the activations autograd keeps for backward, plus the transient
buffers of the backward itself, per sample. :func:`measure_memory` fits the line from two or three
probe sizes, each one forward and backward on the real model (its weights and optimizer are left
untouched):

* **saved activations**, with :func:`torch.autograd.graph.saved_tensors_hooks`: every tensor
  autograd saves for backward is seen once, so this works the same on any device. Storages are
  counted once (a view shares its base's bytes); parameters, counted as parameters, are left out.
* **the measured peak**: on CUDA the caching allocator's ``max_memory_allocated``; on Linux CPUs the
  process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``, with freed heap
  handed back to the system first by glibc's ``malloc_trim``). Elsewhere the peak is estimated as
  gradients plus twice the saved activations.

Out-of-memory errors are recognized by :func:`is_out_of_memory` (``torch.OutOfMemoryError`` and the
CPU allocator's "can't allocate memory" error) so the engine can split a micro-batch that did not
fit (see :class:`~bigbatch.Accumulator`'s ``oom``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import BigBatchError

__all__ = [
    "MemoryBudgetError",
    "OutOfMemory",
    "MemoryProfile",
    "Probe",
    "available_memory",
    "format_bytes",
    "is_out_of_memory",
    "measure_memory",
    "parse_bytes",
    "saved_activation_bytes",
]

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9,
          "GB": 10**9, "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
_CPU_OOM = re.compile(r"can't allocate memory|not enough memory|out of memory", re.IGNORECASE)


class MemoryBudgetError(BigBatchError):
    """A memory budget that cannot be met, or a size that cannot be read."""


class OutOfMemory(BigBatchError):
    """A micro-batch ran out of memory and could not be split any further (one sample)."""


def parse_bytes(text: str | int) -> int:
    """Read a size such as ``8GiB``, ``512MiB``, ``1.5GB`` or ``1073741824`` (bytes).

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024; decimal ones (KB, MB, GB, TB, and the bare
    letters K, M, G, T) powers of 1000.

    Raises:
        MemoryBudgetError: not a positive size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise MemoryBudgetError(f"memory size {text!r} is not a size; write e.g. 8GiB, "
                                    "512MiB or 2GB")
        value, unit = float(match.group(1)), match.group(2).upper()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise MemoryBudgetError(f"memory size {text!r} must be more than 0 bytes")
    return size


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``; binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def is_out_of_memory(err: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and for the CPU allocator's failure (a RuntimeError
    whose message says it cannot allocate memory)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and bool(_CPU_OOM.search(str(err)))


def release_memory(device: torch.device) -> None:
    """Give freed memory back: collect garbage, empty the CUDA cache, trim the C heap."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_status() -> dict[str, int] | None:
    """VmRSS and VmHWM of this process in bytes (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.MULTILINE))
    return {k: int(v) * 1024 for k, v in found.items()} if len(found) == 2 else None


def current_memory(device: torch.device) -> int | None:
    """Bytes held now: CUDA allocated bytes, or this process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    status = _rss_status()
    return None if status is None else status["VmRSS"]


def available_memory(device: torch.device) -> int:
    """Bytes that could still be taken: free device memory on CUDA, ``MemAvailable`` on CPU.

    Raises:
        MemoryBudgetError: the amount cannot be read here (give a budget explicitly).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024
    except (OSError, AttributeError):
        raise MemoryBudgetError("cannot read the available memory on this system; give a budget "
                           "with --memory (e.g. --memory 8GiB)") from None


def default_budget(device: torch.device, fraction: float = 0.8) -> int:
    """What a step may hold at its peak: what is held now plus ``fraction`` of what is free."""
    return int((current_memory(device) or 0) + fraction * available_memory(device))


class PeakMeter:
    """Measures the peak bytes of a block of work, above what was held when it started.

    ``None`` where no peak can be read (CPU outside Linux). On CPU it is the peak resident set of
    the whole process, so run nothing else meanwhile.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start: int | None = None
        self.peak: int | None = None

    def __enter__(self) -> PeakMeter:
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif _rss_status() is not None:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
                self.start = _rss_status()["VmRSS"]  # type: ignore[index]
            except OSError:
                self.start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _rss_status()["VmHWM"]  # type: ignore[index]

    @property
    def increase(self) -> int | None:
        """Peak minus the bytes held at the start."""
        return None if self.peak is None or self.start is None else self.peak - self.start


@contextlib.contextmanager
def _count_saved(exclude: set[int], into: dict[int, int]) -> Iterator[None]:
    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and t.device.type != "meta":
            into[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def saved_activation_bytes(model: torch.nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while ``run()`` computes a loss.

    Each storage is counted once; the storages of ``model``'s parameters and buffers are left out.
    ``run`` is called once; its result is not backpropagated.
    """
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    with _count_saved(exclude, seen):
        out = run()
    del out
    return sum(seen.values())


@dataclass(frozen=True)
class Probe:
    """One probe: two forwards and backwards on ``micro_batch`` samples (accumulating)."""

    micro_batch: int
    saved_bytes: int  # activations saved for backward (hooks)
    peak_bytes: int | None  # measured peak above the bytes held before the probe
    seconds: float  # wall time of the forward and backward
    items: int  # items the loss counted (tokens for a language model)


@dataclass(frozen=True)
class MemoryProfile:
    """The memory line ``peak(m) = fixed + per_sample · m`` of one model, optimizer and data.

    Attributes:
        device: where it was measured.
        held_bytes: bytes held before the probes (CUDA: allocated; CPU: the process's resident
            set), which includes the parameters.
        param_bytes, grad_bytes, optimizer_bytes: parameters, their gradients (one per trainable
            parameter, in its dtype) and the optimizer state once it exists (measured when the
            optimizer has stepped; else estimated from its type: Adam-like 2 slots, SGD with
            momentum 1).
        optimizer_pending: optimizer-state bytes not yet allocated (they will be, at the first
            step), included in :meth:`predict`.
        fixed: intercept of the fitted line, above ``held_bytes`` (gradients and constant
            overheads).
        per_sample: slope of the fitted line (bytes per sample).
        saved_per_sample: activations saved for backward, per sample (hooks).
        measured: whether the line was fitted to measured peaks (else estimated from the hooks).
        probes: the probes it was fitted to.
    """

    device: torch.device
    held_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    optimizer_pending: int
    fixed: float
    per_sample: float
    saved_per_sample: float
    measured: bool
    probes: tuple[Probe, ...] = field(default=())

    @property
    def step_bytes(self) -> int:
        """Bytes the optimizer step itself may add above the fitted line's intercept: the
        gradients plus temporaries of about twice their size (the ``foreach`` Adam kernels)."""
        return 3 * self.grad_bytes

    def predict(self, micro_batch: int) -> int:
        """Predicted peak bytes of a training step with micro-batches of ``micro_batch``: what is
        held now, the optimizer state still to come, and the larger of the fitted line (forward
        and backward) and the optimizer step (after the activations are gone)."""
        line = self.fixed + self.per_sample * micro_batch
        return int(self.held_bytes + self.optimizer_pending + max(line, self.step_bytes))

    def largest_fitting(self, budget: int) -> int:
        """The largest micro-batch whose predicted peak is within ``budget`` (0 when none)."""
        if self.predict(1) > budget:
            return 0
        room = budget - self.held_bytes - self.optimizer_pending - self.fixed
        return max(1, int(room // self.per_sample)) if self.per_sample > 0 else 2**62


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None,
                          params: Sequence[torch.nn.Parameter]) -> tuple[int, int]:
    """(bytes of optimizer state, bytes still to be allocated at its first step)."""
    if optimizer is None:
        return 0, 0
    held = sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    if held:
        return held, 0
    name = type(optimizer).__name__
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if name in ("SGD",):
        slots = 1 if group.get("momentum", 0) else 0
    elif name in ("Adagrad", "RMSprop", "Adadelta", "Rprop", "ASGD"):
        slots = 1 + (1 if group.get("momentum", 0) or name in ("Adadelta", "Rprop") else 0)
    else:  # Adam, AdamW, NAdam, RAdam, Adamax, and unknown optimizers (assume two slots)
        slots = 2 + (1 if group.get("amsgrad") else 0)
    pending = slots * sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return pending, pending


def measure_memory(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], Any],
                   make_batch: Callable[[int], Any], *,
                   optimizer: torch.optim.Optimizer | None = None,
                   sizes: Sequence[int] = (1, 2, 4),
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   ) -> MemoryProfile:
    """Fit ``peak(m) = fixed + per_sample · m`` from probes of the given micro-batch sizes.

    Each probe runs ``loss_fn(model, make_batch(m))`` forward and backward twice on the model as it
    is (activation checkpointing included), as two micro-batches of a cycle: the second runs with
    the first's gradient held, where accumulation peaks. It counts the saved activations (first
    pass) and measures the peak above the bytes held before the probe.
    Nothing of the model changes: gradients are cleared after each probe (the model must hold none
    before), BatchNorm-style buffers and the random-number state are restored, and the optimizer
    is not stepped.

    Args:
        model: the module to train, on its device.
        loss_fn: ``loss_fn(model, batch) -> LossSum``.
        make_batch: ``make_batch(m)`` gives a batch of ``m`` samples as training will see them
            (for padded data, of the longest length: the peak is what matters).
        optimizer: its optimizer, for the state it holds or will hold.
        sizes: probe sizes, at least two different ones; a line is fitted by least squares.
        autocast: the context the forward runs in (mixed precision), if any.

    Returns:
        :class:`MemoryProfile`.

    Raises:
        MemoryBudgetError: fewer than two sizes, or the model already holds gradients.
    """
    sizes = sorted(set(int(s) for s in sizes))
    if len(sizes) < 2 or sizes[0] < 1:
        raise MemoryBudgetError(
            f"measure_memory needs two or more positive probe sizes, got {sizes}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MemoryBudgetError("the model has no trainable parameters to measure")
    if any(p.grad is not None for p in params):
        raise MemoryBudgetError("the model holds gradients; measure it between optimizer steps "
                           "(after zero_grad(set_to_none=True))")
    device = params[0].device
    param_bytes = sum(p.numel() * p.element_size() for p in set(model.parameters()))
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    opt_bytes, pending = optimizer_state_bytes(optimizer, params)
    probes = []
    buffers = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
               if not isinstance(v, torch.nn.Parameter)}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # A first, untimed pass: one-time allocations (thread pools, kernels, caches) are not
        # the step's; the bytes held are read after it.
        _probe(model, loss_fn, make_batch(sizes[0]), sizes[0], autocast, device)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(buffers, strict=False)
        release_memory(device)
        held = current_memory(device)
        for m in sizes:
            probes.append(_probe(model, loss_fn, make_batch(m), m, autocast, device))
            model.zero_grad(set_to_none=True)
            model.load_state_dict(buffers, strict=False)
    release_memory(device)
    measured = all(p.peak_bytes is not None for p in probes) and held is not None
    saved_fixed, saved_slope = _fit([p.micro_batch for p in probes],
                                    [p.saved_bytes for p in probes])
    if measured:
        fixed, slope = _fit([p.micro_batch for p in probes],
                            [p.peak_bytes for p in probes])  # type: ignore[misc]
        # What autograd saves is held at the peak: a floor under the slope (a resident-set peak
        # moves in pages and may not see a small model at all). And a line through noisy peaks
        # must not promise less than any probe used.
        slope = max(slope, saved_slope)
        fixed = max([fixed, grad_bytes + saved_fixed]
                    + [p.peak_bytes - slope * p.micro_batch for p in probes])
    else:  # no peak to read: gradients plus the saved activations, twice (backward transients)
        fixed, slope = grad_bytes + 2 * saved_fixed, 2 * saved_slope
    return MemoryProfile(device=device, held_bytes=held or param_bytes, param_bytes=param_bytes,
                         grad_bytes=grad_bytes, optimizer_bytes=opt_bytes,
                         optimizer_pending=pending, fixed=fixed, per_sample=max(slope, 0.0),
                         saved_per_sample=saved_slope, measured=measured, probes=tuple(probes))


def _probe(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], Any], batch: Any,
           m: int, autocast: Callable[[], contextlib.AbstractContextManager] | None,
           device: torch.device) -> Probe:
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    with PeakMeter(device) as meter:
        # Two passes, as in a cycle: the second runs with the first's gradients held, which is
        # where an accumulating step peaks. Saved bytes and time are the first pass's.
        for i in range(2):
            t0 = time.perf_counter()
            with (_count_saved(exclude, seen) if i == 0 else contextlib.nullcontext(),
                  autocast() if autocast else contextlib.nullcontext()):
                ls = loss_fn(model, batch)
            items = int(ls.count)
            ls.sum.backward()
            del ls
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i == 0:
                seconds = time.perf_counter() - t0
    return Probe(micro_batch=m, saved_bytes=sum(seen.values()), peak_bytes=meter.increase,
                 seconds=seconds, items=items)


def _fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def time_micro_batch(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], Any],
                     batch: Any, *, repeats: int = 3,
                     autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                     ) -> tuple[float, int]:
    """Median seconds of a forward and backward on ``batch`` (after one untimed warm-up), and the
    items the loss counts. Gradients are cleared afterwards; the random-number state is kept."""
    device = next(model.parameters()).device
    times = []
    items = 0
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast() if autocast else contextlib.nullcontext():
                ls = loss_fn(model, batch)
            ls.sum.backward()
            items = int(ls.count)
            del ls
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return (statistics.median(times) if times else math.nan), items
