"""Every way to cut a variable-length global batch, against the limit of no padding at all.

    flock /tmp/bench.lock python -m benchmarks packing [--steps 6] [--seq-len 512]
        [--global-batch 32] [--micro 4] [--png PATH] [--quick]

Data: one sample per top-level function or class of the standard library
(:func:`bigbatch.app.data.stdlib_definitions`), its first ``seq_len + 1`` bytes, through
:class:`~bigbatch.app.data.TokenWindows` (lengths from 15 bytes to ``seq_len``, median ~400).

Model: the built-in byte-level GPT (4 layers, width 128, 4 heads) with ``seq_len`` positions;
AdamW, clipping at 1.0, float32, on the CPU. Each optimizer step trains on one global batch of
``--global-batch`` samples (:func:`bigbatch.app.data.global_batches`, seed 0). The memory budget
of every packing arm is that of a fixed micro-batch, ``micro × seq_len`` token positions. The arms,
each with its own copy of the same initial model, on the same global batches:

* ``pad to max``: ``BatchPlan.split`` into ``--micro`` rows × ``seq_len`` columns;
* ``dynamic padding``: the same micro-batches in data order, each cut to its own longest sample
  (what a collator with dynamic padding, e.g. transformers' ``DataCollatorWithPadding``, does);
* ``group_by_length``: transformers' ``get_length_grouped_indices`` (its Trainer's
  ``group_by_length=True``) orders the samples of mega-batches by length, then consecutive
  micro-batches make a step. Fast, but it **changes which samples share a step** (long ones
  together, short ones together): shown by the share of steps whose sample set differs from the
  global batch's; its update is not the recipe's (skipped when transformers is not installed);
* ``sorted in step``: the step's own samples sorted by length, cut into ``K`` runs of equal row
  counts (``K`` that of the fixed split), each cut to its longest;
* ``tokens``: :func:`bigbatch.pack_by_tokens` (greedy: fewest micro-batches under the budget);
* ``partition``: :func:`bigbatch.partition_by_cost` under a cost model fitted by
  :func:`bigbatch.measure_cost` on this model (printed), the library's fastest padded partition;
* ``rows``: :func:`bigbatch.pack_rows`, padding-free rows (several samples per row, positions
  restarting, attention per sample);
* ``limit``: the step's real tokens concatenated and cut into full rows of ``seq_len`` with plain
  causal attention — no padding and no document boundaries: the cost of the real tokens
  themselves, which no arm can beat (its loss is not the recipe's either).

Arms run interleaved, step by step, in rotating order (:func:`benchmarks._harness.interleave`);
``--warmup`` steps are discarded and medians reported. Timed per step: building the
micro-batches plus ``Accumulator.step``. Tokens/s counts each step's real tokens (the same for
every arm). ``vs sorted`` is the median over steps of time(sorted in step) / time(arm); ``of
limit`` is the arm's real tokens/s over the limit's (the median of per-step ratios). The arms
that keep each step's samples compute the same update: printed as ‖θ_arm − θ_pad‖ / ‖θ_pad −
θ_0‖ (float32 rounding). Writes ``results/packing.json`` and ``results/packing.png``.
``--quick``: a tiny model, 30 stdlib files, 2 steps: a smoke test, not a timing.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bigbatch import Accumulator, BatchPlan, measure_cost, pack_by_tokens, pack_rows
from bigbatch.app.data import (
    TokenWindows,
    global_batches,
    load_documents,
    split_definitions,
    stdlib_definitions,
)
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.app.tasks import gpt_lm_loss
from bigbatch.packing import trim_padding
from bigbatch.partition import equal_row_partition, partition_by_cost

from ._harness import BenchmarkError, interleave, log, parse, parser, results_path, write_results

ARMS = ("pad to max", "dynamic padding", "group_by_length", "sorted in step", "tokens",
        "partition", "rows", "limit")
SAME_UPDATE = ("dynamic padding", "sorted in step", "tokens", "partition", "rows")
Micro = list[dict[str, torch.Tensor]]


def definitions(files: int | None) -> list[tuple[str, bytes]]:
    """Every stdlib definition, or those of the first ``files`` stdlib files (for --quick)."""
    if files is None:
        return stdlib_definitions()
    return split_definitions(load_documents(None)[:files])


def trimmed(batch: dict[str, torch.Tensor], lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    return trim_padding(batch, max(int(lengths.max()), 1))


def length_grouped_steps(windows: TokenWindows, steps: int, global_batch: int,
                         micro: int) -> list[torch.Tensor] | None:
    """The global batches transformers' ``group_by_length`` gives (None without transformers)."""
    try:
        from transformers.trainer_pt_utils import get_length_grouped_indices
    except ImportError:
        return None
    lengths = windows.lengths(torch.arange(len(windows))).tolist()
    order = get_length_grouped_indices(lengths, micro, generator=torch.Generator().manual_seed(0))
    return [torch.tensor(order[i * global_batch:(i + 1) * global_batch]) for i in range(steps)]


def builders(windows: TokenWindows, micro: int, global_batch: int, cost: Any,
             grouped: list[torch.Tensor] | None) -> dict[str, Callable[[int, torch.Tensor], Micro]]:
    plan = BatchPlan(global_batch=global_batch, micro_batch=micro, world_size=1)
    budget, seq = micro * windows.seq_len, windows.seq_len

    def pad(r: int, rows: torch.Tensor) -> Micro:
        return plan.split(windows.batch(rows))

    def dynamic(r: int, rows: torch.Tensor) -> Micro:
        return [trimmed(windows.batch(rows[i:i + micro]), windows.lengths(rows[i:i + micro]))
                for i in range(0, len(rows), micro)]

    def by_length(r: int, rows: torch.Tensor) -> Micro:
        assert grouped is not None
        return dynamic(r, grouped[r])

    def groups(r: int, rows: torch.Tensor, of: Sequence[torch.Tensor]) -> Micro:
        lengths = windows.lengths(rows)
        return [trimmed(windows.batch(rows[g]), lengths[g]) for g in of]

    def sorted_in_step(r: int, rows: torch.Tensor) -> Micro:
        return groups(r, rows, equal_row_partition(windows.lengths(rows), plan.accum_steps))

    def tokens(r: int, rows: torch.Tensor) -> Micro:
        return groups(r, rows, pack_by_tokens(windows.lengths(rows), budget))

    def partition(r: int, rows: torch.Tensor) -> Micro:
        return groups(r, rows, partition_by_cost(windows.lengths(rows), budget, cost))

    def packed_rows(r: int, rows: torch.Tensor) -> Micro:
        return pack_rows(windows.batch(rows), budget)

    def limit(r: int, rows: torch.Tensor) -> Micro:  # the real tokens, as full rows
        batch, lengths = windows.batch(rows), windows.lengths(rows)
        ids = torch.cat([batch["input_ids"][i, :n] for i, n in enumerate(lengths.tolist())])
        labels = torch.cat([batch["labels"][i, :n] for i, n in enumerate(lengths.tolist())])
        n_rows = -(-len(ids) // seq)
        pad_ids = torch.zeros(n_rows * seq, dtype=ids.dtype)
        pad_labels = torch.full((n_rows * seq,), -100, dtype=labels.dtype)
        pad_ids[:len(ids)], pad_labels[:len(labels)] = ids, labels
        full = {"input_ids": pad_ids.view(n_rows, seq), "labels": pad_labels.view(n_rows, seq)}
        return [{k: v[i:i + micro] for k, v in full.items()} for i in range(0, n_rows, micro)]

    out = {"pad to max": pad, "dynamic padding": dynamic, "group_by_length": by_length,
           "sorted in step": sorted_in_step, "tokens": tokens, "partition": partition,
           "rows": packed_rows, "limit": limit}
    return {arm: fn for arm, fn in out.items() if arm != "group_by_length" or grouped}


def relative_difference(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module) -> float:
    """‖a − b‖₂ / ‖b − start‖₂ over all parameters."""
    diff2 = move2 = 0.0
    for x, y, z in zip(a.parameters(), b.parameters(), start.parameters()):
        x, y, z = x.detach().double(), y.detach().double(), z.detach().double()
        diff2 += float(((x - y) ** 2).sum())
        move2 += float(((y - z) ** 2).sum())
    return (diff2 / move2) ** 0.5 if move2 else float("nan")


def run(*, steps: int, warmup: int, seq_len: int, global_batch: int, micro: int,
        config: GPTConfig, defs: list[tuple[str, bytes]]) -> dict[str, Any]:
    windows = TokenWindows([(name, data[: seq_len + 1]) for name, data in defs], seq_len)
    torch.manual_seed(0)
    start = GPT(config)
    batches = global_batches(len(windows), global_batch, seed=0)
    rows = [next(batches) for _ in range(warmup + steps)]
    real = [windows.tokens_in(r) for r in rows]
    grouped = length_grouped_steps(windows, warmup + steps, global_batch, micro)

    def make(r: int, w: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(r * 7919 + w)
        ids = torch.randint(0, 256, (r, w), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}

    t0 = time.perf_counter()
    cost = measure_cost(copy.deepcopy(start), gpt_lm_loss, make, micro * seq_len, seq_len)
    log(f"cost model (probe {time.perf_counter() - t0:.1f}s): {cost.describe()}")
    build = builders(windows, micro, global_batch, cost, grouped)
    arms = list(build)
    models = {arm: copy.deepcopy(start) for arm in arms}
    accs = {arm: Accumulator(m, torch.optim.AdamW(m.parameters(), lr=1e-3), clip_grad_norm=1.0)
            for arm, m in models.items()}
    rec: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}

    def arm_step(arm: str) -> Callable[[int], None]:
        def step(r: int) -> None:  # timed: building the micro-batches and the step
            micro_batches = build[arm](r, rows[r])
            stats = accs[arm].step(micro_batches, gpt_lm_loss)
            rec[arm].append({"count": stats.count, "skipped": stats.skipped,
                             "cells": [m["labels"].numel() for m in micro_batches]})
        return step

    times = interleave({arm: arm_step(arm) for arm in arms}, warmup + steps, label="  packing")
    for arm in arms:
        for r, got in enumerate(rec[arm]):
            want = windows.tokens_in(grouped[r]) if arm == "group_by_length" else real[r]
            if got["count"] != want or got["skipped"]:
                raise BenchmarkError(f"{arm}, step {r + 1}: {got['count']} items of {want}"
                                     + (", skipped" if got["skipped"] else ""))
    out: dict[str, Any] = {"num_samples": len(windows),
                           "mean_real_length": windows.num_tokens / len(windows),
                           "cost_model": cost.as_list(), "arms": {}}
    if grouped is not None:
        moved = sum(set(g.tolist()) != set(r.tolist()) for g, r in zip(grouped, rows))
        out["group_by_length_steps_with_other_samples"] = moved / len(rows)
    sorted_t, limit_t = times["sorted in step"][warmup:], times["limit"][warmup:]
    for arm in arms:
        timed, kept = times[arm][warmup:], rec[arm][warmup:]
        tokens = [g["count"] for g in kept]
        out["arms"][arm] = {
            "tokens_per_s": statistics.median(n / t for n, t in zip(tokens, timed)),
            "seconds_per_step": statistics.median(timed),
            "vs_sorted_in_step": statistics.median(b / a for a, b in zip(timed, sorted_t)),
            "of_limit": statistics.median((n / a) / (m / b) for n, a, m, b in
                                          zip(tokens, timed, real[warmup:], limit_t)),
            "padding_fraction": statistics.fmean(1 - n / sum(g["cells"])
                                                 for n, g in zip(tokens, kept)),
            "micro_batches_per_step": statistics.fmean(len(g["cells"]) for g in kept),
            "largest_micro_batch_positions": max(max(g["cells"]) for g in kept),
            "same_samples_per_step": arm not in ("group_by_length", "limit"),
            "update_diff_vs_pad_to_max": (relative_difference(models[arm], models["pad to max"],
                                                              start)
                                          if arm in SAME_UPDATE else None),
            "seconds_each_step": times[arm],
        }
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| arm | micro-batches per step | padding | real tok/s | vs sorted in step | of limit "
             "| same samples per step | Δθ vs pad to max |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in res["arms"].items():
        delta = a["update_diff_vs_pad_to_max"]
        lines.append(
            f"| {arm} | {a['micro_batches_per_step']:.1f} | {a['padding_fraction']:.0%} | "
            f"{a['tokens_per_s']:,.0f} | {a['vs_sorted_in_step']:.2f}× | {a['of_limit']:.0%} | "
            f"{'yes' if a['same_samples_per_step'] else 'no'} | "
            f"{'—' if delta is None else f'{delta:.0e}'} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Any, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(res["arms"])
    values = [res["arms"][a]["tokens_per_s"] for a in arms]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["#999999" if not res["arms"][a]["same_samples_per_step"] else "#1f77b4"
              for a in arms]
    ax.barh(arms[::-1], values[::-1], color=colors[::-1])
    ax.axvline(res["arms"]["limit"]["tokens_per_s"], color="k", ls="--", lw=1)
    ax.set_xlabel("real tokens / s (median over steps); grey: other samples per step")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("packing", __doc__)
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="steps discarded first")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=4, help="rows of a fixed micro-batch")
    p.add_argument("--png", default=None, help="where the chart goes (default: next to the JSON)")
    args = parse(p, argv)
    if args.quick:
        args.steps, args.warmup, args.seq_len, args.global_batch, args.micro = 2, 1, 64, 16, 4
        config = GPTConfig(seq_len=args.seq_len, n_layer=1, n_head=2, d_model=32)
        files: int | None = 30
    else:
        config = GPTConfig(seq_len=args.seq_len)
        files = None
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    if args.global_batch % args.micro:
        p.error(f"--micro {args.micro} must divide --global-batch {args.global_batch}")
    t0 = time.perf_counter()
    defs = definitions(files)
    log(f"{len(defs):,} definitions parsed in {time.perf_counter() - t0:.1f}s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    res = run(steps=args.steps, warmup=args.warmup, seq_len=args.seq_len,
              global_batch=args.global_batch, micro=args.micro, config=config, defs=defs)
    title = (f"GPT {config.n_layer}×{config.d_model}, seq_len {args.seq_len}, global batch "
             f"{args.global_batch}, budget {args.micro} × {args.seq_len} positions")
    print(f"{res['num_samples']:,} samples, mean real length {res['mean_real_length']:.0f} of "
          f"{args.seq_len}; {title}; float32, median of {args.steps} interleaved steps after "
          f"{args.warmup} warm-up\n")
    print(table(res))
    moved = res.get("group_by_length_steps_with_other_samples")
    if moved is not None:
        print(f"\ngroup_by_length: {moved:.0%} of steps hold other samples than the global batch")
    png = Path(args.png) if args.png else results_path(args, ".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(res, png, title)
    log(f"wrote {png}")
    write_results(args, {
        "settings": {"steps": args.steps, "warmup": args.warmup, "seq_len": args.seq_len,
                     "global_batch": args.global_batch, "micro": args.micro,
                     "token_budget": args.micro * args.seq_len, "quick": args.quick,
                     "model": {"n_layer": config.n_layer, "n_head": config.n_head,
                               "d_model": config.d_model}, "definitions": len(defs)},
        "results": res,
    })
    return 0
