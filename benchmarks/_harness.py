"""What every benchmark shares: flags, the interleaved timing loop, child processes, the
machine's description and the results file.

* **Flags.** :func:`parser` gives a benchmark its ``argparse`` parser (``prog`` ``python -m
  benchmarks NAME``; a bad flag is one line on stderr and exit status 2) with ``--quick`` and
  ``--json``; :func:`parse` parses and records the command line; :func:`fill` fills the flags left
  unset from the full or the quick preset.
* **Timing.** :func:`interleave` takes turns: in round ``r`` every contender runs once on round
  ``r``'s work, in an order rotated by ``r`` places (no contender always goes first or last; each
  keeps the same predecessor, except at the round's start), each call timed alone with
  ``time.perf_counter``. Whatever else the machine does then falls on all contenders alike.
  :func:`summarize` drops the warm-up rounds and gives each contender's median seconds, its ratio
  to a baseline's median, and the median over rounds of the per-round ratio to the baseline (the
  *paired ratio*: drift of the machine between rounds cancels). An A/A row (the baseline again,
  under another name) shows the noise, including what running right after the baseline does.
* **Child processes.** :func:`child` runs ``python -m benchmarks NAME ...`` in a fresh process and
  returns the JSON of the last line it printed (:func:`reply`); memory peaks are measured so, so
  that no configuration inherits another's heap or high-water mark. On CPU (Linux) a child reads
  its peak resident set: :func:`reset_cpu_peak` (``gc.collect()``, glibc's ``malloc_trim(0)``
  hands freed heap back to the kernel, ``5`` written to ``/proc/self/clear_refs`` resets the
  high-water mark; returns ``VmRSS``) before the measured work, :func:`cpu_peak` (``VmHWM``) after.
  :func:`fix_mmap_threshold` first makes the resident set follow the live tensors.
* **Results.** :func:`write_results` writes ``benchmarks/results/NAME.json`` (``--json`` elsewhere;
  with ``--quick``, ``$TMPDIR/bigbatch-benchmarks/NAME.json``, so smoke runs never overwrite the
  committed results) with the command line, the date, the machine and torch's version.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "bigbatch-benchmarks"

Step = Callable[[int], object]


class BenchmarkError(Exception):
    """A benchmark cannot run here, or a child process failed: one line, exit status 1."""


def log(message: str) -> None:
    """Progress goes to stderr; stdout holds the tables."""
    print(message, file=sys.stderr, flush=True)


# -- flags ---------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """A benchmark's flags; a bad one is one line on stderr and exit status 2."""

    def __init__(self, name: str, **kwargs: Any) -> None:
        super().__init__(prog=f"python -m benchmarks {name}", **kwargs)
        self.name = name

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parser(name: str, doc: str | None, *, results: bool = True) -> Parser:
    """The parser of benchmark ``name``: its docstring as help, ``--quick`` and ``--json`` (unless
    ``results`` is false: the internal child processes write no results file)."""
    p = Parser(name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if results:
        p.add_argument("--quick", action="store_true",
                       help="a small smoke setting (seconds); results go to "
                            f"{QUICK_RESULTS}/{name}.json unless --json says where")
        p.add_argument("--json", type=Path,
                       help=f"where to write the results (default benchmarks/results/{name}.json)")
    return p


def parse(p: Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``args.command`` is the command line that reproduces the run."""
    argv = list(sys.argv[2:] if argv is None else argv)
    args = p.parse_args(argv)
    args.name = p.name
    args.command = shlex.join(["python", "-m", "benchmarks", p.name, *argv])
    return args


def fill(args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any]) -> None:
    """Set every flag in the preset (``quick`` with ``--quick``, else ``full``) still None."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def int_list(p: Parser, flag: str, text: str) -> list[int]:
    """``"1,8,32"`` → ``[1, 8, 32]`` (sorted, distinct, each at least 1), or a one-line error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} {text!r} is not a comma list of integers, e.g. 1,8,32")
    if not values or min(values) < 1:
        p.error(f"{flag} {text!r} must list integers >= 1, e.g. 1,8,32")
    return sorted(set(values))


def choices(p: Parser, flag: str, text: str, allowed: Sequence[str],
            aliases: Mapping[str, str] | None = None) -> list[str]:
    """``"a,c"`` → ``["a", "c"]`` in ``allowed``'s order (``aliases`` map old names to new), or a
    one-line error."""
    aliases = aliases or {}
    values = [aliases.get(v.strip(), v.strip()) for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        p.error(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return [v for v in allowed if v in values]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise a CPU or available CUDA device.

    Raises:
        ValueError: not a device, or not one this machine has (the message is one line).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto"
                         ) from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use cpu or auto")
    return device


def device_sync(device: torch.device) -> Callable[[], None] | None:
    """What waits for ``device``'s queued work before a clock is read (None on CPU)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


# -- timing --------------------------------------------------------------------------------------

def run_round(steps: Mapping[str, Step], r: int, times: dict[str, list[float]], *,
              before: Callable[[], object] | None = None,
              after: Callable[[], object] | None = None) -> None:
    """Round ``r``: each contender runs ``step(r)`` once, the order rotated by ``r`` places.

    ``before`` runs before each clock starts (a barrier, a device sync); ``after`` inside the
    clock, at its end (a device sync, so the reading covers queued device work).
    """
    names = list(steps)
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
        if before is not None:
            before()
        t0 = time.perf_counter()
        steps[name](r)
        if after is not None:
            after()
        times.setdefault(name, []).append(time.perf_counter() - t0)


def interleave(steps: Mapping[str, Step], rounds: int, *,
               before: Callable[[], object] | None = None,
               after: Callable[[], object] | None = None,
               label: str | None = None) -> dict[str, list[float]]:
    """Seconds of every round of every contender (warm-up included), in turns (:func:`run_round`).

    ``steps`` maps a name to ``step(r)``, which does round ``r``'s work (the same work for every
    contender). With ``label``, each round is announced on stderr.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        if label:
            log(f"{label}: round {r + 1}/{rounds}")
        run_round(steps, r, times, before=before, after=after)
    return times


def summarize(times: Mapping[str, Sequence[float]], warmup: int,
              baseline: str | None = None) -> dict[str, Any]:
    """Medians of the rounds after ``warmup``; with a ``baseline``, the ratios to it.

    Returns:
        ``seconds`` (median per contender), ``ratio`` (median / the baseline's median),
        ``paired_ratio`` (median over rounds of the time / the baseline's time in that round),
        ``rounds`` (every round's seconds, the warm-up ones included).
    """
    kept = {name: list(t[warmup:]) for name, t in times.items()}
    empty = [name for name, t in kept.items() if not t]
    if empty:
        raise BenchmarkError(f"no timed rounds after {warmup} warm-up for {', '.join(empty)}")
    med = {name: statistics.median(t) for name, t in kept.items()}
    out: dict[str, Any] = {"seconds": med}
    if baseline is not None:
        base = kept[baseline]
        out["ratio"] = {name: m / med[baseline] for name, m in med.items()}
        out["paired_ratio"] = {name: statistics.median(a / b for a, b in zip(t, base))
                               for name, t in kept.items()}
    out["rounds"] = {name: list(t) for name, t in times.items()}
    return out


# -- child processes -----------------------------------------------------------------------------

def child(name: str, argv: Sequence[str], *, timeout: float | None = 3600) -> Any:
    """Run ``python -m benchmarks NAME ARGV`` in a fresh process (from the repository root);
    the JSON of the last line it printed.

    Raises:
        BenchmarkError: it failed or timed out (with the last line of its stderr), or its last
            line is not JSON.
    """
    cmd = [sys.executable, "-m", "benchmarks", name, *argv]
    shown = shlex.join(["python", *cmd[1:]])
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkError(f"child process `{shown}` ran past {timeout:.0f}s") from None
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchmarkError(f"child process `{shown}` failed (exit {r.returncode}): {tail}")
    lines = r.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchmarkError(f"child process `{shown}` printed no JSON line") from None


def torchrun(name: str, argv: Sequence[str], nproc: int, threads: int) -> None:
    """Run ``python -m benchmarks NAME ARGV`` in ``nproc`` processes under ``torchrun
    --standalone`` (from the repository root, ``OMP_NUM_THREADS=threads``); their output passes
    through.

    Raises:
        BenchmarkError: a process failed (its error is in the output above).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "benchmarks", name, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if code != 0:
        raise BenchmarkError(f"torchrun with {nproc} processes failed (exit {code}); "
                             "see its output above")


def reply(result: Any) -> None:
    """A child process's answer to :func:`child`: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


# -- memory peaks on CPU (Linux, glibc) ----------------------------------------------------------

M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024  # glibc mallopt parameter; bytes


def status_bytes(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024  # "VmHWM:   223552 kB"
    raise BenchmarkError(f"/proc/self/status has no {key}")


def check_cpu_peaks() -> None:
    """Raise :class:`BenchmarkError` unless this is Linux with a resettable ``VmHWM``."""
    if not Path("/proc/self/clear_refs").exists():
        raise BenchmarkError("CPU peaks need Linux's /proc/self/clear_refs and VmHWM; "
                             "run on Linux or with --device cuda")


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fix_mmap_threshold() -> None:
    """Serve every allocation of 128 KiB or more by its own mmap, unmapped on free.

    Setting ``M_MMAP_THRESHOLD`` also turns off glibc's dynamic threshold, which otherwise rises
    to the size of freed blocks (up to 32 MiB) and keeps such blocks in the heap afterwards: the
    resident set then follows the live tensors.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or libc.mallopt(M_MMAP_THRESHOLD,
                                                                     MMAP_THRESHOLD) != 1:
        raise BenchmarkError("this CPU measure needs glibc's mallopt")


def reset_cpu_peak() -> int:
    """Collect garbage, hand freed heap back to the kernel (``malloc_trim(0)``; no-op without
    glibc), reset the high-water mark to the resident set; returns that set (``VmRSS``)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
    return status_bytes("VmRSS")


def cpu_peak() -> int:
    """The resident set's high-water mark (``VmHWM``) since :func:`reset_cpu_peak`."""
    return status_bytes("VmHWM")


# -- machine and results -------------------------------------------------------------------------

def machine(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, torch's threads, OS, Python, the device (and GPU name), load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "device": str(device or "cpu")}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_average"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(m: Mapping[str, Any]) -> str:
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
    return f"{where}; {m['platform']}, Python {m['python']}"


def results_path(args: argparse.Namespace, suffix: str = ".json") -> Path:
    """``--json``, else ``benchmarks/results/NAME.json`` (with ``--quick``: in the temporary
    folder); another ``suffix`` (``.png``) names a file next to it."""
    if args.json is not None:
        path = Path(args.json)
    else:
        path = (QUICK_RESULTS if args.quick else RESULTS) / f"{args.name}.json"
    return path if suffix == ".json" else path.with_suffix(suffix)


def write_results(args: argparse.Namespace, results: Mapping[str, Any], *,
                  device: torch.device | None = None) -> Path:
    """Write the results file: the benchmark, command line, date, machine, torch's version,
    ``quick``, then ``results``' own keys. Returns its path."""
    record = {"benchmark": args.name, "command": args.command,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(device), "torch": torch.__version__, "quick": args.quick,
              **results}
    path = results_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {path}")
    return path
