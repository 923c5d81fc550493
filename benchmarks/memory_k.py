"""Peak memory and time per optimizer step vs K at a fixed global batch, on the default GPT.

    python -m benchmarks memory_k --device cpu     # global 64: micro 64, 32, 16, 8, 4
    python -m benchmarks memory_k --quick          # smoke test: a tiny model, K = 1 and 2

The default ``bigbatch train`` model and step (4 layers, width 128, 128-byte samples; AdamW with
betas 0.9/0.95 and weight decay 0.1; clipping at 1.0; the gradient noise scale on, as in the
trainer; the trainer's learning-rate schedule, which changes neither memory nor time, is left
out) trains on random bytes (memory does not depend on the text) with one global batch (64) cut
into micro-batches of M = 64, 32, 16, 8, 4 (K = G / M). Each M runs in its own fresh Python
process (``python -m benchmarks memory_k --child``: :func:`benchmarks._harness.child`), so no
configuration inherits another's heap or high-water mark. In it:

1. warm-up: one accumulated step and one single micro-batch step, so AdamW's state exists, every
   kernel and shape has run once, and the gradient bytes can be read off the ``.grad`` tensors;
2. ``--repeats`` times, alternating, two measured steps (the median of each is reported):
   * **single micro-batch step**: ``acc.step([one micro-batch of M])``: one forward + backward
     and the optimizer step: what a step with global batch M costs;
   * **accumulated step**: ``acc.step(K micro-batches of M)``: K forward + backward passes, then
     the normalization, clipping and optimizer step: global batch G;

Time is measured apart, in one more process: one model and Accumulator take accumulated steps at
every M in turn (M₁ M₂ … M₅, then M₂ … M₅ M₁, …: the order rotates each round; the first round is
warm-up; :func:`benchmarks._harness.interleave`), ``--steps`` timed rounds (CUDA synchronized);
the median seconds per optimizer step of each M. Taking turns, the settings share whatever else
the machine is doing.

How a peak is measured. Each step is measured as the growth above what was resident just before
it (the *increment*), in two ways ("measures"), each on CPU in its own fresh process:

* CPU (Linux): before the step, ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed heap
  back to the kernel (otherwise memory freed by earlier work, still resident, would hide the
  step's growth); then ``5`` written to ``/proc/self/clear_refs`` resets the process's
  high-water mark to its current resident set, which is read (``VmRSS``) as *pre*
  (:func:`benchmarks._harness.reset_cpu_peak`). After the step
  ``VmHWM`` is the *absolute peak RSS* (it also counts Python, libtorch and the input batches);
  ``increment = peak RSS - pre`` is what the step added: activations, gradients, autograd and
  optimizer temporaries, plus whatever the allocator keeps.

  - ``live`` ("tensors"): the process first sets glibc's ``M_MMAP_THRESHOLD`` to 128 KiB
    (``mallopt``), so every tensor of 128 KiB or more gets its own mapping, unmapped when freed:
    the resident set then follows the live tensors (repeats agree to about 0.1 MiB).
  - ``held`` ("default malloc"): glibc as every process gets it. Its mmap threshold rises to the
    size of freed blocks (up to 32 MiB), after which large tensors live in the heap, and memory
    freed within a step stays resident for reuse: the increment includes the heap's free space
    and fragmentation, which varies by several percent from one repeat to the next.

* CUDA: both from one process, after ``torch.cuda.empty_cache()`` and
  ``reset_peak_memory_stats()``: ``live`` from ``memory_allocated()`` before and
  ``max_memory_allocated()`` after (tensors only), ``held`` from ``memory_reserved()`` and
  ``max_memory_reserved()`` (the caching allocator's segments). Neither counts the CUDA context.

The **step peak** in the table and plot is ``parameters + optimizer state + increment``: the
training state resident between steps plus what the step adds on top, comparable between devices
and between K. The **static part** (``parameters + gradients + AdamW state``, in bytes of the
tensors themselves) is the floor that no choice of K goes below: above it is the activation
share, which falls with the micro-batch. The ratio *accumulated / single* (target ≤ 1.05) is of
step peaks of the ``live`` measure (also given for ``held``); *vs K=1* divides each accumulated
step peak by that of K = 1.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bigbatch import Accumulator

from ._harness import (
    check_cpu_peaks,
    child,
    cpu_peak,
    device_sync,
    fill,
    fix_mmap_threshold,
    interleave,
    log,
    machine,
    parse,
    parser,
    reply,
    reset_cpu_peak,
    resolve_device,
    results_path,
    write_results,
)
from .peer_methods import FULL_SHAPE, QUICK_SHAPE, build_model, make_optimizer, sum_loss

MIB = 2**20
TARGET = 1.05  # accumulated step peak / single micro-batch step peak
CLIP = 1.0
FULL = {"global_batch": 64, "micros": "64,32,16,8,4", "steps": 10, "repeats": 3}
QUICK = {"global_batch": 4, "micros": "4,2", "steps": 2, "repeats": 1}  # one thread, too


# -- peak memory ------------------------------------------------------------------------------

def measure_peak(fn: Callable[[], Any], device: torch.device, measure: str,
                 ) -> dict[str, dict[str, int]]:
    """Run ``fn`` once; bytes before it and at its peak, per measure (module docstring).

    On CPU the one measure this process was set up for (``live`` or ``held``); on CUDA both:
    ``live`` from the allocated-bytes counters, ``held`` from the reserved-bytes counters.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the reserve then holds only live blocks, like malloc_trim
        pre = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        return {name: {"pre_bytes": b, "peak_abs_bytes": p, "increment_bytes": p - b}
                for name, b, p in zip(("live", "held"), pre, peak)}
    before = reset_cpu_peak()
    fn()
    after = cpu_peak()
    return {measure: {"pre_bytes": before, "peak_abs_bytes": after,
                      "increment_bytes": after - before}}


# -- one configuration (the child process) ----------------------------------------------------

def _shape(args: argparse.Namespace) -> Any:
    return QUICK_SHAPE if args.quick else FULL_SHAPE


def _cycles(args: argparse.Namespace, micro: int, device: torch.device, n: int,
            ) -> list[list[dict[str, torch.Tensor]]]:
    """``n`` global batches of random bytes, each cut into its micro-batches, on the device."""
    seq_len = _shape(args).seq_len
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (args.global_batch, seq_len + 1), generator=g)
        out.append([{"input_ids": c[:, :-1].contiguous().to(device),
                     "labels": c[:, 1:].contiguous().to(device)}
                    for c in ids.split(micro)])
    return out


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _training(args: argparse.Namespace, device: torch.device,
              ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Accumulator]:
    """The default model, AdamW and an Accumulator as ``bigbatch train`` uses it (one process,
    float32, clipping at 1.0, the noise scale as ``--noise-scale`` says)."""
    model = build_model("default", _shape(args)).to(device)
    opt = make_optimizer(model)
    acc = Accumulator(model, opt, clip_grad_norm=CLIP, noise_scale=args.noise_scale)
    return model, opt, acc


def run_timing(args: argparse.Namespace, micros: list[int]) -> dict[str, list[float]]:
    """Seconds of each timed accumulated step, per micro-batch size; the sizes take turns."""
    device = resolve_device(args.device)
    if args.quick:
        torch.set_num_threads(1)
    _, _, acc = _training(args, device)
    cycles = {m: _cycles(args, m, device, 2) for m in micros}
    wait = device_sync(device)
    steps = {str(m): (lambda r, c=cycles[m]: acc.step(c[r % 2], sum_loss)) for m in micros}
    times = interleave(steps, args.steps + 1, before=wait, after=wait)
    return {m: t[1:] for m, t in times.items()}  # round 0 is warm-up


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one micro-batch size with one CPU measure (or both on CUDA); JSON-ready."""
    device = resolve_device(args.device)
    if args.quick:
        torch.set_num_threads(1)  # a smoke test on a shared machine: no spinning thread team
    if device.type == "cpu":
        check_cpu_peaks()
        if args.measure == "live":
            fix_mmap_threshold()
    model, opt, acc = _training(args, device)
    cycles = _cycles(args, args.micro, device, 2)
    k = len(cycles[0])

    # Warm-up; the gradient bytes are read while the cycle is in flight.
    for i, batch in enumerate(cycles[0]):
        acc.accumulate(batch, sum_loss, last=i == k - 1)
    grad_bytes = _tensor_bytes(p.grad for p in set(model.parameters()))
    acc.finish()
    acc.step(cycles[1][:1], sum_loss)
    params = set(model.parameters())
    static = {"params": _tensor_bytes(params), "grads": grad_bytes,
              "optimizer_state": _tensor_bytes(v for s in opt.state.values() for v in s.values())}
    static["total"] = sum(static.values())
    resident = static["params"] + static["optimizer_state"]

    samples: dict[str, dict[str, list[dict[str, int]]]] = {}
    for r in range(args.repeats):
        cycle = cycles[r % 2]
        for kind, batches in (("single", cycle[:1]), ("accumulated", cycle)):
            got = measure_peak(lambda b=batches: acc.step(b, sum_loss), device, args.measure)
            for measure, sample in got.items():
                samples.setdefault(measure, {}).setdefault(kind, []).append(sample)

    def summary(runs: list[dict[str, int]]) -> dict[str, Any]:
        med = {key: int(statistics.median(run[key] for run in runs)) for key in runs[0]}
        return {**med, "step_peak_bytes": resident + med["increment_bytes"], "samples": runs}

    return {"micro": args.micro, "k": k,
            "memory": {measure: {kind: summary(runs) for kind, runs in kinds.items()}
                       for measure, kinds in samples.items()},
            "static": static,
            "parameters": sum(p.numel() for p in params),
            "threads": torch.get_num_threads()}


# -- the sweep (the parent process) -----------------------------------------------------------

LABELS = {"cpu": {"live": "tensors", "held": "default malloc"},
          "cuda": {"live": "allocated", "held": "reserved"}}


def _run_child(args: argparse.Namespace, *extra: str) -> Any:
    return child("memory_k", [*extra, "--global-batch", str(args.global_batch),
                              "--steps", str(args.steps), "--repeats", str(args.repeats),
                              "--device", args.device,
                              "--noise-scale" if args.noise_scale else "--no-noise-scale",
                              *(["--quick"] if args.quick else [])])


def _run_config(args: argparse.Namespace, micro: int, device: torch.device,
                measures: list[str]) -> dict[str, Any]:
    """One fresh process per CPU measure; one on CUDA (both measures)."""
    got = [_run_child(args, "--child", "--micro", str(micro), "--measure", m)
           for m in (["both"] if device.type == "cuda" else measures)]
    return {**got[-1], "memory": {k: v for g in got for k, v in g["memory"].items()}}


def _rows(results: list[dict[str, Any]], measures: list[str]) -> list[dict[str, Any]]:
    base = next((r for r in results if r["k"] == 1), results[0])
    rows = []
    for r in results:
        row: dict[str, Any] = {"k": r["k"], "micro": r["micro"],
                               "seconds_per_step": r["seconds_per_step"]}
        for measure in measures:
            mem = r["memory"][measure]
            single = mem["single"]["step_peak_bytes"]
            accumulated = mem["accumulated"]["step_peak_bytes"]
            row[measure] = {
                "single_peak_mib": single / MIB, "accumulated_peak_mib": accumulated / MIB,
                "ratio": accumulated / single, "excess_mib": (accumulated - single) / MIB,
                "vs_k1": accumulated / base["memory"][measure]["accumulated"]["step_peak_bytes"],
                "single_increment_mib": mem["single"]["increment_bytes"] / MIB,
                "accumulated_increment_mib": mem["accumulated"]["increment_bytes"] / MIB,
                "accumulated_peak_abs_mib": mem["accumulated"]["peak_abs_bytes"] / MIB,
            }
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], device: str, measures: list[str]) -> str:
    head, rule = ["K", "micro"], ["---:", "---:"]
    for measure in measures:
        label = LABELS[device][measure]
        head += [f"single step peak, {label} (MiB)", f"accumulated step peak, {label} (MiB)",
                 "accumulated / single"]
        rule += ["---:"] * 3
        if measure == measures[0]:
            head.append("vs K=1")
            rule.append("---:")
    head.append("s / optimizer step")
    rule.append("---:")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for r in rows:
        cells = [str(r["k"]), str(r["micro"])]
        for measure in measures:
            m = r[measure]
            cells += [f"{m['single_peak_mib']:.1f}", f"{m['accumulated_peak_mib']:.1f}",
                      f"{m['ratio']:.3f}"]
            if measure == measures[0]:
                cells.append(f"{m['vs_k1']:.2f}")
        cells.append("—" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, measures = report["rows"], report["measures"]
    ks = [r["k"] for r in rows]
    static = report["static"]["total"] / MIB
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(11, 4.4))
    for measure, color in zip(measures, ("C0", "C1")):
        label = LABELS[report["device"]][measure]
        mem.plot(ks, [r[measure]["accumulated_peak_mib"] for r in rows], "o-", color=color,
                 label=f"accumulated step (global {report['global_batch']}), {label}")
        mem.plot(ks, [r[measure]["single_peak_mib"] for r in rows], "s--", color=color,
                 alpha=0.6, label=f"single micro-batch step (global = micro), {label}")
    mem.axhspan(0, static, color="0.85", zorder=0,
                label=f"static: params + grads + AdamW state ({static:.1f} MiB)")
    top = max(r[m]["accumulated_peak_mib"] for r in rows for m in measures)
    mem.set_ylim(0, top * 1.08)
    mem.set_ylabel("step peak (MiB): params + optimizer state\n+ growth during the step")
    mem.set_title("peak memory per optimizer step")
    mem.legend(fontsize=7, loc="upper right")
    secs = [r["seconds_per_step"] for r in rows]
    if all(s is not None for s in secs):
        sec.plot(ks, secs, "o-", color="C2")
    sec.set_ylim(bottom=0)
    sec.set_ylabel("seconds per optimizer step (median)")
    sec.set_title(f"time per optimizer step (median of {report['steps']})")
    for ax in (mem, sec):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [f"{r['k']}\n({r['micro']})" for r in rows])
        ax.minorticks_off()
        ax.set_xlabel("K (micro-batch size)")
        ax.grid(alpha=0.3)
    m = report["model"]
    fig.suptitle(f"GPT {m['n_layer']}×{m['d_model']} ({m['parameters']:,} parameters), "
                 f"{m['seq_len']}-byte samples, global batch {report['global_batch']}, "
                 f"{report['device_name']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_micros(p: Any, text: str, global_batch: int) -> list[int]:
    try:
        micros = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"--micros {text!r}: give comma-separated integers")
    bad = [m for m in micros if m <= 0 or global_batch % m]
    if not micros or bad:
        p.error(f"micro-batch sizes {bad or micros} do not divide the global batch "
                f"{global_batch}; give divisors, e.g. --micros 64,32,16")
    return micros


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("memory_k", __doc__)
    p.add_argument("--steps", type=int, help="timed optimizer steps per K (default 10)")
    p.add_argument("--repeats", type=int,
                   help="memory measurements per step kind (median; default 3)")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step (64)")
    p.add_argument("--micros", help="micro-batch sizes (default 64,32,16,8,4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--measures", default="live,held",
                   help="CPU: 'live' (tensors), 'held' (default malloc) or both")
    p.add_argument("--noise-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the gradient noise scale, as bigbatch train does")
    p.add_argument("--png", help="where to draw the plot (default: next to the JSON)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    p.add_argument("--measure", default="held", help=argparse.SUPPRESS)
    p.add_argument("--child-timing", help=argparse.SUPPRESS)
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    if args.steps < 0 or args.repeats < 1 or args.global_batch < 1:
        p.error("--steps must be >= 0, --repeats and --global-batch >= 1")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        p.error(str(err))

    if args.child:
        reply(run_child(args))
        return 0
    if args.child_timing:
        reply(run_timing(args, _parse_micros(p, args.child_timing, args.global_batch)))
        return 0

    micros = _parse_micros(p, args.micros, args.global_batch)
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    if device.type == "cuda":
        measures = ["live", "held"]
    elif not measures or any(m not in ("live", "held") for m in measures):
        p.error(f"--measures {args.measures!r}: give live, held or live,held")
    if device.type == "cpu":
        check_cpu_peaks()
    load = os.getloadavg()
    results = []
    for micro in micros:
        results.append(_run_config(args, micro, device, measures))
        r = results[-1]
        log(f"K={r['k']:>3} micro {micro:>4}: accumulated step peak "
            f"{r['memory'][measures[0]]['accumulated']['step_peak_bytes'] / MIB:.1f} MiB")
    if args.steps:
        timing = _run_child(args, "--child-timing", ",".join(map(str, micros)))
        for r in results:
            r["step_seconds"] = timing[str(r["micro"])]
            r["seconds_per_step"] = statistics.median(r["step_seconds"])
    else:
        for r in results:
            r["step_seconds"], r["seconds_per_step"] = [], None
    rows = _rows(results, measures)
    shape = _shape(args)
    first = measures[0]
    report = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"{machine()['cpu']}, {results[0]['threads']} thread(s)"),
        "load_average_before_after": [load[0], os.getloadavg()[0]],
        "model": {"n_layer": shape.n_layer, "n_head": shape.n_head, "d_model": shape.d_model,
                  "seq_len": shape.seq_len, "parameters": results[0]["parameters"]},
        "global_batch": args.global_batch, "steps": args.steps, "repeats": args.repeats,
        "noise_scale": args.noise_scale, "measures": measures,
        "static": results[0]["static"], "target_ratio": TARGET,
        "within_target": all(r[first]["ratio"] <= TARGET for r in rows),
        "rows": rows, "configs": results,
    }
    st = report["static"]
    print(f"GPT {shape.n_layer}×{shape.d_model}, {report['model']['parameters']:,} parameters, "
          f"global batch {args.global_batch} × {shape.seq_len} bytes, {report['device_name']}; "
          f"median of {args.repeats} peaks and {args.steps} timed steps\n")
    print(table(rows, device.type, measures))
    print(f"\nstatic: params {st['params'] / MIB:.1f} + grads {st['grads'] / MIB:.1f} + AdamW "
          f"state {st['optimizer_state'] / MIB:.1f} = {st['total'] / MIB:.1f} MiB; step peak = "
          "params + optimizer state + growth during the step")
    worst = max(rows, key=lambda r: r[first]["ratio"])
    w = worst[first]
    print(f"worst accumulated / single ({LABELS[device.type][first]}): {w['ratio']:.3f} at "
          f"K={worst['k']}, +{w['accumulated_peak_mib'] - w['single_peak_mib']:.1f} MiB "
          f"(target <= {TARGET}: {'met' if report['within_target'] else 'not met'})")
    write_results(args, report, device=device)
    png = Path(args.png) if args.png else results_path(args, ".png")
    plot(report, png)
    log(f"wrote {png}")
    return 0
