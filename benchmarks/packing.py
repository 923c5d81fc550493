"""Token-budget micro-batches against fixed-size padded ones, on variable-length code.

    flock /tmp/bench.lock python -m benchmarks packing [--steps 10] [--seq-len 1024]
        [--global-batch 64] [--micro 8] [--samples definition [window]] [--quick]

Data: one document per top-level function or class of the standard library
(:func:`bigbatch.app.data.stdlib_definitions`), through
:class:`~bigbatch.app.data.TokenWindows`.
``--samples definition`` keeps one sample per definition (its first ``seq_len + 1`` bytes: long
definitions are truncated); ``--samples window`` cuts every definition into windows of
``seq_len + 1`` bytes, so a long class gives many full windows and only its last is short
(sample-weighted, most windows are then full: less padding to save).

Model: the default byte-level GPT (4 layers, width 128) with ``seq_len`` positions; AdamW, clipping
at 1.0, float32. Each optimizer step trains on one global batch of ``--global-batch`` samples
(:func:`bigbatch.app.data.global_batches`, seed 0), cut three ways, each arm with its own copy of
the same initial model and the same batches:

* ``fixed``: ``BatchPlan.split`` into micro-batches of ``--micro`` rows × ``seq_len`` columns;
* ``fixed, trimmed``: the same micro-batches, each cut to its own longest sample (what a
  collator with dynamic padding does);
* ``packed``: sorted by length and packed under a budget of ``micro × seq_len`` token positions
  (:func:`bigbatch.packing.packed_micro_batches`), so no micro-batch is larger than a fixed one.

Arms run interleaved, step by step, in rotating order (:func:`benchmarks._harness.interleave`);
the first ``--warmup`` steps are discarded and medians are reported. Timed per step: building the
micro-batches plus ``Accumulator.step``. Tokens/s counts real (non-padding) tokens, the same for
every arm; the speed-up is the median over steps of time(fixed) / time(arm) on the same global
batch. All arms compute the same update, so after the run their weights should agree up to
float32 rounding: printed as the largest per-tensor relative difference and as
‖θ_packed − θ_fixed‖ / ‖θ_fixed − θ_0‖.
``--quick``: a tiny model, 30 stdlib files, 2 steps of both sample kinds: a smoke test, not a
timing.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
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
from bigbatch.packing import label_lengths, trim_padding

from ._harness import BenchmarkError, interleave, parse, parser, write_results
from .peer_methods import sum_loss

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
    batches = global_batches(len(windows), global_batch, seed=0)
    rows = [next(batches) for _ in range(warmup + steps)]
    real = [windows.tokens_in(r) for r in rows]
    rec: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}

    def arm_step(arm: str) -> Callable[[int], None]:
        def step(r: int) -> None:  # timed: building the micro-batches and the step
            micro_batches = build[arm](rows[r])
            stats = accs[arm].step(micro_batches, sum_loss)
            rec[arm].append({"loss": stats.loss, "count": stats.count, "skipped": stats.skipped,
                             "cells": [m["labels"].numel() for m in micro_batches]})
        return step

    times = interleave({arm: arm_step(arm) for arm in ARMS}, warmup + steps, label=f"  {samples}")
    for arm in ARMS:
        for r, got in enumerate(rec[arm]):
            if got["count"] != real[r] or got["skipped"]:
                raise BenchmarkError(f"{arm}, step {r + 1}: {got['count']} items of {real[r]}"
                                     + (", skipped" if got["skipped"] else ""))
    out: dict[str, Any] = {"samples": samples, "num_samples": len(windows),
                           "mean_real_length": windows.num_tokens / len(windows), "arms": {}}
    base, base_timed = rec["fixed"], times["fixed"][warmup:]
    for arm in ARMS:
        timed, kept, tokens = times[arm][warmup:], rec[arm][warmup:], real[warmup:]
        max_rel, rel_to_update = relative_differences(models[arm], models["fixed"], start)
        out["arms"][arm] = {
            "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, timed)),
            "seconds_per_step": statistics.median(timed),
            "speedup_vs_fixed": statistics.median(b / a for a, b in zip(timed, base_timed)),
            "padding_fraction": statistics.fmean(1 - n / sum(g["cells"])
                                                 for n, g in zip(tokens, kept)),
            "micro_batches_per_step": statistics.fmean(len(g["cells"]) for g in kept),
            "largest_micro_batch_positions": max(max(g["cells"]) for g in kept),
            "max_rel_param_diff_vs_fixed": max_rel,
            "param_diff_over_update_vs_fixed": rel_to_update,
            "max_abs_loss_diff_vs_fixed": max(
                abs(a["loss"] - b["loss"]) for a, b in zip(rec[arm], base)),
            "seconds_each_step": timed,
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


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("packing", __doc__)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=2, help="steps discarded first")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro", type=int, default=8, help="rows of a fixed micro-batch")
    p.add_argument("--samples", nargs="+", choices=["definition", "window"],
                   default=["definition"])
    args = parse(p, argv)
    if args.quick:
        args.steps, args.warmup, args.seq_len, args.global_batch, args.micro = 2, 1, 64, 16, 4
        args.samples = ["definition", "window"]
        config = GPTConfig(seq_len=args.seq_len, n_layer=1, n_head=2, d_model=32)
        files: int | None = 30
    else:
        config = GPTConfig(seq_len=args.seq_len)
        files = None
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
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
    write_results(args, {
        "settings": {"steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len,
                     "global_batch": args.global_batch, "micro": args.micro,
                     "token_budget": args.micro * args.seq_len, "quick": args.quick,
                     "model": {"n_layer": config.n_layer, "n_head": config.n_head,
                               "d_model": config.d_model}, "definitions": len(defs)},
        "results": results,
    })
    return 0
