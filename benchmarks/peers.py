"""bigbatch against the hand-written loop, Accelerate, Lightning and the HF Trainer, and inside
them (its integrations).

    python -m benchmarks peers           # both models, K = 1, 8, 32: about 6 min on 2 CPU cores
    python -m benchmarks peers --quick   # smoke run, < 1 min
    python -m benchmarks peers --models default --k 8 --steps 30 --parts speed

On each model (``default``: the ``bigbatch train`` GPT; ``gpt2``: a GPT-2-shaped
``transformers.GPT2LMHeadModel`` of the same size, randomly initialized; see
:mod:`benchmarks.peer_methods`) and padded, variable-length batches of the Python standard
library's source bytes, three parts:

1. **speed** (float32, on ``--device``): seconds per optimizer step of each method at each K of
   ``--k``, micro-batches of ``--micro`` rows: the hand loop, the same hand loop again (``hand2``,
   an A/A check whose distance from the first is the noise of the measurement), bigbatch,
   Accelerate, Lightning and the HF Trainer, each alone and with its bigbatch integration
   (``accelerate_bb``, ``lightning_bb``, ``hftrainer_bb``). All start from the same weights and
   take the same cycle in each round, in turns (the order rotates by one place per round:
   :func:`benchmarks._harness.interleave`). The first ``--warmup`` rounds (at K > 8: one) are
   discarded; the table gives the median of the others (``--steps`` of them at K = 8, and at
   other K as many micro-batches: ``steps · 8 / K`` rounds, at least 8) and, in brackets, the
   median over rounds of its time divided by the hand loop's time on the same cycle (drift of the
   machine cancels); each integration also divided by its trainer alone's. Lightning and the HF
   Trainer cannot be paused between steps: each runs in a thread of its own, handed one cycle
   per round, and its step is timed from the hand-over to its request for the next cycle's first
   micro-batch (:class:`benchmarks.trainer_methods.Threaded`). The HF Trainer's rows run in a
   second interleaved group, with a hand loop of their own, after the others (its
   ``Accelerator`` overwrites Accelerate's process-wide accumulation settings). On CUDA every
   reading follows a device synchronization.
2. **correctness** (float64, on CPU): from the same initial weights and the same micro-batches in
   the same order, ``--correct-steps`` optimizer steps of ``--correct-k`` micro-batches with each
   method, and with the full batch in one pass (the mean over every real token of the cycle,
   written without the engine). Reported: ``‖θ_method − θ_full‖ / ‖θ_full − θ_0‖`` over all
   parameters as one vector: how far a method's weights end from the full-batch weights,
   relative to how far training moved them.
3. **memory** (float32, on ``--device``): the full batch (K=1: ``--global-batch`` rows in one
   micro-batch) against the same global batch in K micro-batches, for each K of ``--k`` that
   divides it, all through ``Accumulator.step``. Time per step: interleaved rounds in this
   process, as in part 1 (``--steps`` / 2 of them after the warm-up). Peak memory: each K in a
   fresh process (:mod:`benchmarks.fullbatch_child`) that reports its peak resident set
   (``VmHWM``, reset before the measured steps; Linux) or, on CUDA, ``max_memory_allocated``.

Accelerate, Lightning and transformers come with the ``bench`` extra
(``pip install -e ".[bench]"``; the HF Trainer rows need transformers >= 5); a peer that is not
installed is skipped with a note, as is the ``gpt2`` model without ``transformers``.
Results: markdown tables on stdout (progress on stderr), ``--json`` and ``--png``
(``benchmarks/results/peers.json`` and ``.png``; with ``--quick``, in the temporary folder; the
PNG goes next to the JSON unless ``--png`` says where).
Nothing here asserts anything about time: the numbers are what this machine measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ._harness import (
    child,
    choices,
    device_sync,
    fill,
    int_list,
    interleave,
    log,
    machine,
    machine_line,
    parse,
    parser,
    resolve_device,
    results_path,
    summarize,
    write_results,
)
from .peer_methods import (
    FULL_SHAPE,
    METHODS,
    MODELS,
    PEERS,
    QUICK_SHAPE,
    BigBatch,
    Corpus,
    build_model,
    clone,
    describe_model,
    make_method,
    missing_packages,
)

PARTS = ("speed", "correctness", "memory")
DISTANCE = "‖θ_method − θ_full‖ / ‖θ_full − θ_0‖ (all parameters as one vector, float64)"
LABELS = {"hand": "hand loop (loss/K)", "hand2": "hand loop again (A/A noise check)",
          "hand_hf": "hand loop (the HF Trainer's group)",
          "bigbatch": "bigbatch Accumulator",
          "accelerate": "Accelerate accumulate()", "lightning": "Lightning accumulate_grad_batches",
          "hftrainer": "HF Trainer (num_items_in_batch)",
          "accelerate_bb": "Accelerate + bigbatch", "lightning_bb": "Lightning + bigbatch",
          "hftrainer_bb": "HF Trainer + bigbatch", "full": "full batch (truth)"}
INTEGRATIONS = {"accelerate_bb": "accelerate", "lightning_bb": "lightning",
                "hftrainer_bb": "hftrainer"}  # integration -> the trainer alone
DEFAULTS = {"k": "1,8,32", "micro": 8, "steps": 16, "warmup": 2, "correct_k": 8,
            "correct_steps": 4, "global_batch": 64, "memory_steps": 2, "threads": 0}
QUICK = {"k": "1,2", "micro": 2, "steps": 2, "warmup": 1, "correct_k": 2, "correct_steps": 2,
         "global_batch": 4, "memory_steps": 1, "threads": 1}
MIN_LARGE_K_STEPS = 8


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser("peers", __doc__)
    p.add_argument("--models", default="default,gpt2", help="comma list of: default, gpt2")
    p.add_argument("--peers", default="accelerate,lightning,hftrainer",
                   help="comma list of: accelerate, lightning, hftrainer (each with its bigbatch "
                        "integration); or none")
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    p.add_argument("--k", help=f"micro-batches per step, comma list (default {DEFAULTS['k']})")
    p.add_argument("--micro", type=int, help=f"rows per micro-batch (default {DEFAULTS['micro']})")
    p.add_argument("--steps", type=int,
                   help=f"timed optimizer steps per method at K=8 (default {DEFAULTS['steps']}); "
                        f"at other K: steps × 8 / K, at least {MIN_LARGE_K_STEPS}")
    p.add_argument("--warmup", type=int,
                   help=f"discarded rounds before the timed ones (default {DEFAULTS['warmup']}; "
                        "at K > 8 at most 1)")
    p.add_argument("--correct-k", type=int,
                   help=f"K of the correctness part (default {DEFAULTS['correct_k']})")
    p.add_argument("--correct-steps", type=int,
                   help=f"optimizer steps of the correctness part "
                        f"(default {DEFAULTS['correct_steps']})")
    p.add_argument("--global-batch", type=int,
                   help=f"rows per step in the memory part (default {DEFAULTS['global_batch']})")
    p.add_argument("--memory-steps", type=int,
                   help=f"measured steps per memory process (default {DEFAULTS['memory_steps']})")
    p.add_argument("--threads", type=int,
                   help="torch intra-op threads (default: torch's choice; 1 with --quick)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--png", type=Path,
                   help="where to draw the plot (default: next to the JSON, as peers.png)")
    p.add_argument("--seed", type=int, default=0, help="weights and data order (default 0)")
    args = parse(p, argv)
    fill(args, DEFAULTS, QUICK)
    args.k = int_list(p, "--k", args.k)
    args.models = choices(p, "--models", args.models, MODELS)
    args.peers = [] if args.peers.strip() == "none" else choices(p, "--peers", args.peers, PEERS)
    args.parts = choices(p, "--parts", args.parts, PARTS)
    for flag in ("micro", "steps", "correct_k", "correct_steps", "global_batch", "memory_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    if args.warmup < 0 or args.threads < 0:
        p.error("--warmup and --threads must be 0 or more")
    try:
        args.device = _device(args.device)
    except ValueError as err:
        p.error(str(err))
    args.png = args.png or results_path(args, ".png")
    args.shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    return args


def _device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index not in (None, 0):
        raise ValueError(f"--device {name}: Accelerate takes the first visible GPU; run with "
                         f"CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
    return device


# -- part 1: speed -----------------------------------------------------------------------------

def timed_steps(steps: int, k: int) -> int:
    """Timed rounds at K: ``steps`` at K = 8, else as many micro-batches: ``steps · 8 / K``
    rounds, but at least 8 (small K is cheap and noisy, large K slow and steadier)."""
    return max(MIN_LARGE_K_STEPS, math.ceil(steps * 8 / k))


def warmup_rounds(warmup: int, k: int) -> int:
    """Discarded rounds at K: ``warmup`` up to K = 8, then at most 1 (a round is K steps' work)."""
    return warmup if k <= 8 else min(warmup, 1)


def interleave_methods(methods: dict[str, Any], cycles: Sequence[Sequence[Any]],
                       device: torch.device) -> dict[str, list[float]]:
    """Seconds per optimizer step of each method, taking turns on the same cycle each round.

    ``methods`` maps a name to an object with ``step(cycle)``; their order rotates by one place
    each round (:func:`benchmarks._harness.interleave`).
    """
    steps = {name: (lambda r, m=method: m.step(cycles[r])) for name, method in methods.items()}
    wait = device_sync(device)
    return interleave(steps, len(cycles), before=wait, after=wait)


def speed_groups(methods: Sequence[str]) -> list[list[str]]:
    """The methods interleaved together: the HF Trainer's apart, with a hand loop of its own
    (``hand_hf``), since its ``Accelerator`` resets Accelerate's process-wide settings."""
    hf = [m for m in methods if m.startswith("hftrainer")]
    rest = [m for m in methods if m not in hf]
    return [rest] + ([["hand_hf", *hf]] if hf else [])


def trainer_ratios(times: dict[str, list[float]], warm: int) -> dict[str, float]:
    """Each integration's time over its trainer alone's, median over the timed rounds."""
    return {bb: statistics.median(a / b for a, b in zip(times[bb][warm:], times[alone][warm:]))
            for bb, alone in INTEGRATIONS.items() if bb in times and alone in times}


def run_speed(name: str, corpus: Corpus, args: argparse.Namespace,
              methods: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for k in args.k:
        warm = warmup_rounds(args.warmup, k)
        n = warm + timed_steps(args.steps, k)
        row: dict[str, Any] = {"k": k, "micro": args.micro, "rows_per_step": k * args.micro,
                               "timed_steps": n - warm, "warmup": warm, "seconds": {},
                               "ratio": {}, "paired_ratio": {}, "rounds": {},
                               "trainer_ratio": {}}
        t0 = time.perf_counter()
        for group in speed_groups(methods):
            log(f"speed   {name}: K={k}, {n} rounds of {', '.join(group)}")
            corpus.restart()
            base = _model(name, args).to(args.device)
            cycles = corpus.cycles(n, k, args.micro, args.device)
            with tempfile.TemporaryDirectory() as work:
                steppers = {m: make_method(m.replace("hand_hf", "hand"), clone(base), k,
                                           args.device, steps=n, workdir=work) for m in group}
                times = interleave_methods(steppers, cycles, args.device)
                for method in steppers.values():
                    method.close()
            got = summarize(times, warm, group[0])
            for key in ("seconds", "ratio", "paired_ratio", "rounds"):
                row[key].update(got[key])
            row["trainer_ratio"].update(trainer_ratios(times, warm))
            del steppers, cycles, base
            gc.collect()
        rows.append(row)
        log(f"        {time.perf_counter() - t0:.0f}s; ratio to hand: " + ", ".join(
            f"{m} {row['ratio'][m]:.3f}" for m in methods) + "; to the trainer alone: "
            + ", ".join(f"{m} {r:.3f}" for m, r in row["trainer_ratio"].items()))
    return rows


# -- part 2: correctness -----------------------------------------------------------------------

def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_correctness(name: str, corpus: Corpus, args: argparse.Namespace,
                    methods: Sequence[str]) -> dict[str, Any]:
    k, steps, cpu = args.correct_k, args.correct_steps, torch.device("cpu")
    log(f"correct {name}: float64, {steps} steps of K={k} × {args.micro} rows, "
        f"{', '.join(['full', *methods])}")
    corpus.restart()
    base = _model(name, args).double()
    theta0 = _flat(base)
    cycles = corpus.cycles(steps, k, args.micro)
    tokens = [[int((b["labels"] != -100).sum()) for b in cycle] for cycle in cycles]
    final: dict[str, torch.Tensor] = {}
    for m in ("full", *methods):
        model = clone(base)
        with tempfile.TemporaryDirectory() as work:
            method = make_method(m, model, k, cpu, steps=steps, workdir=work)
            for cycle in cycles:
                method.step(cycle)
            method.close()
        final[m] = _flat(model)
    moved = float(torch.linalg.vector_norm(final["full"] - theta0))
    distance = {m: float(torch.linalg.vector_norm(final[m] - final["full"])) / moved
                for m in methods}
    return {"k": k, "micro": args.micro, "steps": steps, "dtype": "float64", "device": "cpu",
            "tokens_per_micro_batch": tokens, "full_batch_moved": moved, "distance": distance,
            "formula": DISTANCE}


# -- part 3: full batch vs accumulation --------------------------------------------------------

def memory_ks(args: argparse.Namespace) -> list[int]:
    """K = 1 and every K of ``--k`` that divides the global batch."""
    return sorted({1, *(k for k in args.k if args.global_batch % k == 0)})


def run_memory(name: str, corpus: Corpus, args: argparse.Namespace) -> list[dict[str, Any]]:
    ks, g = memory_ks(args), args.global_batch
    n = args.warmup + max(MIN_LARGE_K_STEPS, math.ceil(args.steps / 2))
    log(f"memory  {name}: global batch {g} as K = {', '.join(map(str, ks))}; "
        f"time: {n} interleaved rounds")
    base = _model(name, args).to(args.device)
    cycles = {}
    for k in ks:  # the same global batches at every K
        corpus.restart()
        cycles[k] = corpus.cycles(n, k, g // k, args.device)
    accs = {k: BigBatch(clone(base)) for k in ks}
    wait = device_sync(args.device)
    steps = {str(k): (lambda r, a=accs[k], c=cycles[k]: a.step(c[r])) for k in ks}
    times = interleave(steps, n, before=wait, after=wait)
    del steps, accs, cycles, base
    gc.collect()
    rows = []
    for k in ks:
        peak = _child_peak(name, k, args)
        rows.append({"k": k, "micro": g // k, "global_batch": g,
                     "seconds": statistics.median(times[str(k)][args.warmup:]),
                     "rounds": times[str(k)], **peak})
    for row in rows:
        row["seconds_vs_full"] = row["seconds"] / rows[0]["seconds"]
        row["peak_vs_full"] = row["peak_bytes"] / rows[0]["peak_bytes"]
    return rows


def _child_peak(name: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    shape = args.shape
    return child("fullbatch_child", [
        "--model", name, "--k", str(k), "--global-batch", str(args.global_batch),
        "--steps", str(args.memory_steps), "--device", str(args.device), "--seed", str(args.seed),
        "--threads", str(args.threads),
        "--shape", f"{shape.n_layer},{shape.n_head},{shape.d_model},{shape.seq_len}"])


# -- report ------------------------------------------------------------------------------------

def _model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    return build_model(name, args.shape, args.seed)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _fmt_dist(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def markdown(report: dict[str, Any]) -> str:
    out = []
    models = report["models"]
    speed = {n: r["speed"] for n, r in models.items() if r.get("speed")}
    correct = {n: r["correctness"] for n, r in models.items() if r.get("correctness")}
    if speed or correct:
        ks = sorted({row["k"] for rows in speed.values() for row in rows})
        ck = next(iter(correct.values()))["k"] if correct else None
        head = ["model", "method", *(f"K={k}: s/step (× hand)" for k in ks)]
        if correct:
            head.append(f"distance to full batch (K={ck}, float64)")
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in models:
            methods = [m for m in METHODS if any(m in row["seconds"] for row in
                                                 speed.get(name, []))
                       or m in correct.get(name, {}).get("distance", {})]
            for m in methods:
                cells = [name, LABELS[m]]
                for k in ks:
                    row = next((r for r in speed.get(name, []) if r["k"] == k), None)
                    cells.append("—" if row is None or m not in row["seconds"] else
                                 f"{row['seconds'][m]:.4f} ({row['paired_ratio'][m]:.3f})")
                if correct:
                    d = correct.get(name, {}).get("distance", {})
                    cells.append(_fmt_dist(d[m]) if m in d else "—")
                out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if speed:
            row = next(iter(speed.values()))[0]
            out.append(f"Speed: float32 on {report['machine']['device']}, micro-batches of "
                       f"{row['micro']} rows; median seconds per optimizer step over "
                       + ", ".join(f"{r['timed_steps']} (K={r['k']}, {r['warmup']} discarded "
                                   "before)" for r in next(iter(speed.values())))
                       + " interleaved rounds; in brackets the median over rounds of the "
                       "ratio to the hand loop's time on the same cycle. "
                       "The A/A row is the same hand loop timed again as if it were another "
                       "method: its distance from 1 is the noise of the measurement.")
        if correct:
            c = next(iter(correct.values()))
            out.append(f"Distance: {DISTANCE}, after {c['steps']} AdamW steps with clipping "
                       f"from the same weights and micro-batches; θ_full: the full batch in "
                       "one pass with the token mean over the whole global batch.")
        out.append("")
        out += integration_table(speed, correct)
    mem = {n: r["memory"] for n, r in models.items() if r.get("memory")}
    if mem:
        unit = "peak allocated (MiB)" if report["machine"]["device"].startswith("cuda") else \
            "peak RSS (MiB)"
        out += [f"| model | K × micro-batch | s/step | × full | {unit} | × full | "
                "above start of step (MiB) |", "|---|---|---|---|---|---|---|"]
        for name, rows in mem.items():
            for r in rows:
                label = f"{r['k']} × {r['micro']}" + (" (full batch)" if r["k"] == 1 else "")
                out.append(f"| {name} | {label} | {r['seconds']:.4f} | "
                           f"{r['seconds_vs_full']:.3f} | {r['peak_bytes'] / 2**20:.1f} | "
                           f"{r['peak_vs_full']:.3f} | {r['increment_bytes'] / 2**20:.1f} |")
        out.append("")
        r0 = next(iter(mem.values()))[0]
        out.append(f"Global batch {r0['global_batch']} rows through `Accumulator.step`; each K's "
                   f"peak from its own process ({r0['measure']}).")
        out.append("")
    if report["skipped"]:
        out.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items()))
        out.append("")
    out.append(f"Machine: {machine_line(report['machine'])}; torch {report['versions']['torch']}"
               + "".join(f", {p} {v}" for p, v in report["versions"].items()
                         if p != "torch" and v))
    out.append(f"Command: `{report['command']}`")
    return "\n".join(out) + "\n"


def integration_table(speed: dict[str, list[dict[str, Any]]],
                      correct: dict[str, dict[str, Any]]) -> list[str]:
    """Each bigbatch integration against its trainer alone: time ratio and distance."""
    names = [n for n in (speed.keys() | correct.keys())]
    shown = [m for m in INTEGRATIONS if any(
        m in row.get("trainer_ratio", {}) for n in names for row in speed.get(n, []))
        or any(m in correct.get(n, {}).get("distance", {}) for n in names)]
    if not shown:
        return []
    ks = sorted({row["k"] for rows in speed.values() for row in rows})
    head = ["model", "integration", *(f"K={k}: × the trainer alone" for k in ks),
            "distance to full batch: trainer alone → with bigbatch"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in sorted(names, key=list(MODELS).index):
        for m in shown:
            cells = [name, LABELS[m]]
            for k in ks:
                row = next((r for r in speed.get(name, []) if r["k"] == k), {})
                ratio = row.get("trainer_ratio", {}).get(m)
                cells.append("—" if ratio is None else f"{ratio:.3f}")
            d = correct.get(name, {}).get("distance", {})
            alone = INTEGRATIONS[m]
            cells.append(f"{_fmt_dist(d[alone])} → {_fmt_dist(d[m])}"
                         if m in d and alone in d else "—")
            out.append("| " + " | ".join(cells) + " |")
    out += ["", "× the trainer alone: median over the timed rounds of the integration's seconds "
            "per step divided by its trainer's own on the same cycle (goal ≤ 1.02).", ""]
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """Three panels: speed ratios vs K, distances to the full batch, memory and time vs K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {"default": "-", "gpt2": "--"}
    colors = {"hand": "tab:gray", "hand2": "silver", "bigbatch": "tab:blue",
              "accelerate": "tab:orange", "lightning": "tab:purple", "hftrainer": "tab:brown",
              "accelerate_bb": "gold", "lightning_bb": "orchid", "hftrainer_bb": "tan"}
    ax = axes[0]
    ks: set[int] = set()
    for name, res in models.items():
        for m in METHODS:
            pts = [(r["k"], r["paired_ratio"][m]) for r in res.get("speed") or []
                   if m in r["paired_ratio"]]
            ks.update(k for k, _ in pts)
            if pts:
                ax.plot(*zip(*pts), styles.get(name, ":"), marker="o", color=colors[m],
                        label=f"{m} ({name})")
    ax.axhline(1.0, color="black", lw=0.5)
    _k_axis(ax, ks, "K (micro-batches per optimizer step)")
    ax.set_ylabel("median over rounds of s/step ÷ hand loop's")
    ax.set_title("1. speed, float32 (hand2: the hand loop again)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    names = [n for n, r in models.items() if r.get("correctness")]
    shown = [m for m in METHODS if any(m in models[n]["correctness"]["distance"] for n in names)]
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        dist = models[name]["correctness"]["distance"]
        ms = [m for m in shown if m in dist]
        xs = [shown.index(m) + i * width for m in ms]
        ys = [max(dist[m], 1e-17) for m in ms]
        ax.bar(xs, ys, width, color=[colors[m] for m in ms], hatch="//" if i else None,
               edgecolor="black", label=name)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0e}", (x, y), ha="center", fontsize=7, textcoords="offset points",
                        xytext=(0, 2))
    ax.set_yscale("log")
    ax.set_ylim(1e-17, 30)
    ax.set_xticks([j + (len(names) - 1) * width / 2 for j in range(len(shown))], shown)
    ax.set_ylabel("‖θ − θ_full‖ / ‖θ_full − θ_0‖")
    ax.set_title("2. distance to the full-batch weights, float64")
    if names:
        ax.legend(fontsize=7, title="model (hatched: 2nd)", title_fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5 if len(shown) < 3 else 0.36, 0.8))
    ax = axes[2]
    ks = set()
    for name, res in models.items():
        rows = res.get("memory") or []
        ks.update(r["k"] for r in rows)
        if rows:
            ax.plot([r["k"] for r in rows], [r["peak_bytes"] / 2**20 for r in rows],
                    styles.get(name, ":"), marker="s", color="tab:green", label=name)
            for r in rows:
                ax.annotate(f"{r['seconds']:.3g} s", (r["k"], r["peak_bytes"] / 2**20),
                            fontsize=7, textcoords="offset points", xytext=(4, 4))
    _k_axis(ax, ks, "K at a fixed global batch (K=1: the full batch)")
    ax.margins(x=0.12)
    ax.set_ylabel("peak memory of the process (MiB)")
    ax.set_title("3. full batch vs accumulation (labels: s/step)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(f"bigbatch vs peers — {machine_line(report['machine'])}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _k_axis(ax: Any, ks: set[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    if ks:
        ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.minorticks_off()
    ax.set_xlabel(label)


# -- main --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skipped: dict[str, str] = {}
    models = []
    for name in args.models:
        missing = missing_packages(name)
        if missing:
            skipped[name] = f"{', '.join(missing)} not installed: pip install -e '.[bench]'"
        else:
            models.append(name)
    methods = ["hand", "bigbatch"]
    for peer in args.peers:
        missing = missing_packages(peer)
        if missing:
            skipped[peer] = "not installed: pip install -e '.[bench]'"
        elif peer == "hftrainer" and int(_version("transformers").split(".")[0]) < 5:
            skipped[peer] = "the HF Trainer rows need transformers >= 5"
        else:
            methods += [peer, f"{peer}_bb"]
    for what, why in skipped.items():
        log(f"note: skipping {what}: {why}")
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "command": args.command, "machine": machine(args.device),
        "versions": {p: _version(p) for p in ("torch", "transformers", "accelerate", "lightning")},
        "settings": {"k": args.k, "micro": args.micro, "steps": args.steps,
                     "warmup": args.warmup, "correct_k": args.correct_k,
                     "correct_steps": args.correct_steps, "global_batch": args.global_batch,
                     "memory_steps": args.memory_steps, "seed": args.seed, "quick": args.quick,
                     "shape": dataclasses.asdict(args.shape), "parts": args.parts,
                     "methods": methods,
                     "optimizer": "AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)",
                     "clip_grad_norm": 1.0},
        "formulas": {"distance": DISTANCE,
                     "ratio": "median s/step of the method / median s/step of the hand loop",
                     "paired_ratio": "median over rounds of (method's s/step / hand loop's s/step "
                                     "on the same cycle); the table's number",
                     "trainer_ratio": "median over rounds of (an integration's s/step / its "
                                      "trainer alone's s/step on the same cycle)",
                     "threaded_timing": "Lightning and the HF Trainer run in a thread each, "
                                        "handed one cycle per round; a step is timed from the "
                                        "hand-over to the trainer's request for the next "
                                        "cycle's first micro-batch",
                     "hf_group": "the HF Trainer rows are interleaved in a second group with a "
                                 "hand loop of their own (hand_hf), whose times give their "
                                 "ratio to the hand loop"},
        "skipped": skipped, "models": {}}
    corpus = Corpus(args.shape.seq_len, args.seed)
    for name in models:
        res: dict[str, Any] = {"description": describe_model(name, _model(name, args),
                                                             args.shape)}
        report["models"][name] = res
        if "speed" in args.parts:
            res["speed"] = run_speed(name, corpus, args, ["hand", "hand2", *methods[1:]])
        if "correctness" in args.parts:
            res["correctness"] = run_correctness(name, corpus, args, methods)
        if "memory" in args.parts:
            res["memory"] = run_memory(name, corpus, args)
    report["seconds_total"] = time.perf_counter() - t_start
    report["markdown"] = markdown(report)
    print(report["markdown"], end="")
    write_results(args, report, device=args.device)
    plot(report, args.png)
    log(f"wrote {args.png}; {report['seconds_total']:.0f}s in all")
    return 0
