"""Token-budget micro-batches against fixed-size padded ones, on variable-length code.

    flock /tmp/bench.lock python benchmarks/packing.py [--steps 10] [--seq-len 1024]
        [--global-batch 64] [--micro 8] [--samples definition [window]] [--quick]

Data: one document per top-level function or class of the standard library
(:func:`bigbatch.data.stdlib_definitions`), through :class:`~bigbatch.data.TokenWindows`.
``--samples definition`` keeps one sample per definition (its first ``seq_len + 1`` bytes: long
definitions are truncated); ``--samples window`` cuts every definition into windows of
``seq_len + 1`` bytes, so a long class gives many full windows and only its last is short
(sample-weighted, most windows are then full: less padding to save).

Model: the default byte-level GPT (4 layers, width 128) with ``seq_len`` positions; AdamW, clipping
at 1.0, float32. Each optimizer step trains on one global batch of ``--global-batch`` samples
(:func:`bigbatch.data.global_batches`, seed 0), cut three ways, each arm with its own copy of the
same initial model and the same batches:

* ``fixed``: ``BatchPlan.split`` into micro-batches of ``--micro`` rows × ``seq_len`` columns;
* ``fixed, trimmed``: the same micro-batches, each cut to its own longest sample (what a
  collator with dynamic padding does);
* ``packed``: sorted by length and packed under a budget of ``micro × seq_len`` token positions
  (:func:`bigbatch.packing.packed_micro_batches`), so no micro-batch is larger than a fixed one.

Arms run interleaved, step by step, in rotating order; the first ``--warmup`` steps are discarded
and medians are reported. Timed per step: building the micro-batches plus ``Accumulator.step``.
Tokens/s counts real (non-padding) tokens, the same for every arm. All arms compute the same
update, so after the run their weights should agree up to float32 rounding: printed as the largest
per-tensor relative difference and as ‖θ_packed − θ_fixed‖ / ‖θ_fixed − θ_0‖.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bigbatch import Accumulator, BatchPlan
from bigbatch.app.data import (
    TokenWindows,
    global_batches,
    load_documents,
    packed_micro_batches,
    split_definitions,
    stdlib_definitions,
)
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.app.workload import lm_loss
from bigbatch.packing import label_lengths, trim_padding

ARMS = ("fixed", "fixed, trimmed", "packed")


def definitions(files: int | None) -> list[tuple[str, bytes]]:
    """Every stdlib definition, or those of the first ``files`` stdlib files (for --quick)."""
    if files is None:
        return stdlib_definitions()
    return split_definitions(load_documents(None)[:files])


def make_windows(defs: list[tuple[str, bytes]], seq_len: int, samples: str) -> TokenWindows:
    if samples == "definition":  # one sample per definition: its first seq_len + 1 bytes
        defs = [(name, data[: seq_len + 1]) for name, data in defs]
    return TokenWindows(defs, seq_len)


def builders(windows: TokenWindows, micro: int, global_batch: int
             ) -> dict[str, Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    plan = BatchPlan(global_batch=global_batch, micro_batch=micro, world_size=1)
    budget = micro * windows.seq_len

    def fixed(rows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return plan.split(windows.batch(rows))

    def trimmed(rows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [trim_padding(m, max(int(label_lengths(m["labels"]).max()), 1))
                for m in fixed(rows)]

    def packed(rows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return packed_micro_batches(windows, rows, budget)

    return dict(zip(ARMS, (fixed, trimmed, packed)))


def relative_differences(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module
                         ) -> tuple[float, float]:
    """(max over tensors of ‖a − b‖∞ / ‖b‖∞, ‖a − b‖₂ / ‖b − start‖₂)."""
    worst, diff2, move2 = 0.0, 0.0, 0.0
    for x, y, z in zip(a.parameters(), b.parameters(), start.parameters()):
        x, y, z = x.detach().double(), y.detach().double(), z.detach().double()
        worst = max(worst, float((x - y).abs().max() / y.abs().max()))
        diff2 += float(((x - y) ** 2).sum())
        move2 += float(((y - z) ** 2).sum())
    return worst, (diff2 / move2) ** 0.5 if move2 else float("nan")


def run(samples: str, *, steps: int, warmup: int, seq_len: int, global_batch: int, micro: int,
        config: GPTConfig, defs: list[tuple[str, bytes]]) -> dict[str, Any]:
    windows = make_windows(defs, seq_len, samples)
    build = builders(windows, micro, global_batch)
    torch.manual_seed(0)
    start = GPT(config)
    models = {arm: copy.deepcopy(start) for arm in ARMS}
    accs = {arm: Accumulator(m, torch.optim.AdamW(m.parameters(), lr=1e-3), clip_grad_norm=1.0)
            for arm, m in models.items()}
    rec: dict[str, dict[str, list[float]]] = {
        arm: {"seconds": [], "tok_s": [], "padding": [], "micro": [], "largest": [], "loss": []}
        for arm in ARMS}
    batches = global_batches(len(windows), global_batch, seed=0)
    for step in range(warmup + steps):
        print(f"  {samples}: step {step + 1}/{warmup + steps}", file=sys.stderr, flush=True)
        rows = next(batches)
        real = windows.tokens_in(rows)
        for j in range(len(ARMS)):
            arm = ARMS[(step + j) % len(ARMS)]  # rotate who goes first
            t0 = time.perf_counter()
            micro_batches = build[arm](rows)
            stats = accs[arm].step(micro_batches, lm_loss)
            seconds = time.perf_counter() - t0
            assert stats.count == real and not stats.skipped
            rec[arm]["loss"].append(stats.loss)
            if step < warmup:
                continue
            cells = [m["labels"].numel() for m in micro_batches]
            r = rec[arm]
            r["seconds"].append(seconds)
            r["tok_s"].append(real / seconds)
            r["padding"].append(1 - real / sum(cells))
            r["micro"].append(len(micro_batches))
            r["largest"].append(max(cells))
    out: dict[str, Any] = {"samples": samples, "num_samples": len(windows),
                           "mean_real_length": windows.num_tokens / len(windows), "arms": {}}
    base = rec["fixed"]
    for arm in ARMS:
        r = rec[arm]
        max_rel, rel_to_update = relative_differences(models[arm], models["fixed"], start)
        out["arms"][arm] = {
            "tokens_per_s": statistics.median(r["tok_s"]),
            "seconds_per_step": statistics.median(r["seconds"]),
            "speedup_vs_fixed": statistics.median(
                b / a for a, b in zip(r["seconds"], base["seconds"])),
            "padding_fraction": sum(r["padding"]) / len(r["padding"]),
            "micro_batches_per_step": sum(r["micro"]) / len(r["micro"]),
            "largest_micro_batch_positions": max(r["largest"]),
            "max_rel_param_diff_vs_fixed": max_rel,
            "param_diff_over_update_vs_fixed": rel_to_update,
            "max_abs_loss_diff_vs_fixed": max(
                abs(a - b) for a, b in zip(r["loss"], base["loss"])),
            "seconds_each_step": r["seconds"],
        }
    return out


def table(results: list[dict[str, Any]], micro: int, seq_len: int) -> str:
    lines = ["| samples | micro-batches | per step | padding | real tok/s | speed-up | "
             "Δθ vs fixed (rel. to update) |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for arm, a in res["arms"].items():
            shape = {"fixed": f"{micro} × {seq_len}",
                     "fixed, trimmed": f"{micro} × own longest",
                     "packed": f"≤ {micro * seq_len} positions"}[arm]
            delta = "—" if arm == "fixed" else f"{a['param_diff_over_update_vs_fixed']:.1e}"
            lines.append(
                f"| {res['samples']} | {arm}: {shape} | {a['micro_batches_per_step']:.1f} | "
                f"{a['padding_fraction']:.0%} | {a['tokens_per_s']:,.0f} | "
                f"{a['speedup_vs_fixed']:.2f}× | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=2, help="steps discarded first")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8, help="rows of a fixed micro-batch")
    parser.add_argument("--samples", nargs="+", choices=["definition", "window"],
                        default=["definition"])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 30 stdlib files, 2 steps: a smoke test, not a timing")
    parser.add_argument("--json", default="benchmarks/results/packing.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.seq_len, args.global_batch, args.micro = 2, 1, 64, 16, 4
        args.samples = ["definition", "window"]
        config = GPTConfig(seq_len=args.seq_len, n_layer=1, n_head=2, d_model=32)
        files: int | None = 30
    else:
        config = GPTConfig(seq_len=args.seq_len)
        files = None
    t0 = time.perf_counter()
    defs = definitions(files)
    print(f"{len(defs):,} definitions parsed in {time.perf_counter() - t0:.1f}s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = []
    for samples in args.samples:
        res = run(samples, steps=args.steps, warmup=args.warmup, seq_len=args.seq_len,
                  global_batch=args.global_batch, micro=args.micro, config=config, defs=defs)
        print(f"samples={samples}: {res['num_samples']:,} samples, mean real length "
              f"{res['mean_real_length']:.0f} of {args.seq_len}", flush=True)
        results.append(res)
    print(f"\ndefault GPT shape ({config.n_layer} layers, width {config.d_model}), seq_len "
          f"{args.seq_len}, global batch {args.global_batch}, float32, median of {args.steps} "
          f"interleaved steps after {args.warmup} warm-up\n")
    print(table(results, args.micro, args.seq_len))
    for res in results:
        for arm, a in res["arms"].items():
            if arm != "fixed":
                print(f"{res['samples']}, {arm} vs fixed: max per-tensor rel. weight diff "
                      f"{a['max_rel_param_diff_vs_fixed']:.1e}, max |loss diff| "
                      f"{a['max_abs_loss_diff_vs_fixed']:.1e}, largest micro-batch "
                      f"{a['largest_micro_batch_positions']} positions (fixed: "
                      f"{res['arms']['fixed']['largest_micro_batch_positions']})")
    record = {
        "settings": {"steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len,
                     "global_batch": args.global_batch, "micro": args.micro,
                     "token_budget": args.micro * args.seq_len, "quick": args.quick,
                     "model": {"n_layer": config.n_layer, "n_head": config.n_head,
                               "d_model": config.d_model}, "definitions": len(defs)},
        "environment": {"torch": torch.__version__, "python": sys.version.split()[0],
                        "platform": platform.platform(), "cpus": os.cpu_count(),
                        "threads": torch.get_num_threads()},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
