"""Time cost of measuring the gradient noise scale, on the default model.

    python -m benchmarks noise_overhead [--steps 30] [--k 4] [--micro 8]
    python -m benchmarks noise_overhead --quick      # a tiny model, 2 steps, 1 thread: a smoke test

Two copies of the default GPT (4 layers, width 128, 128-byte samples; AdamW, lr 1e-4) train on
the same batches of random bytes, one with ``Accumulator(..., noise_scale=True)``, one without,
taking turns step by step (the order alternating each round:
:func:`benchmarks._harness.interleave`; the first ``--warmup`` rounds discarded); the median
seconds per optimizer step of each and their ratio are printed, and the median over rounds of
the per-round ratio.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from bigbatch import Accumulator
from bigbatch.loss import LossSum, token_cross_entropy

from ._harness import fill, interleave, parse, parser, summarize, write_results
from .peer_methods import FULL_SHAPE, QUICK_SHAPE, build_model

FULL = {"steps": 30, "k": 4, "micro": 8, "warmup": 3}
QUICK = {"steps": 2, "k": 2, "micro": 2, "warmup": 1}


def loss(model: torch.nn.Module, batch: torch.Tensor) -> LossSum:
    return token_cross_entropy(model(batch[:, :-1]), batch[:, 1:])


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("noise_overhead", __doc__)
    p.add_argument("--steps", type=int, help=f"timed steps (default {FULL['steps']})")
    p.add_argument("--k", type=int, help=f"micro-batches per step (default {FULL['k']})")
    p.add_argument("--micro", type=int, help=f"rows per micro-batch (default {FULL['micro']})")
    p.add_argument("--warmup", type=int, help=f"rounds discarded first (default {FULL['warmup']})")
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    if min(args.steps, args.k, args.micro) < 1 or args.warmup < 0:
        p.error("--steps, --k and --micro must be at least 1, --warmup at least 0")
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    if args.quick:
        torch.set_num_threads(1)  # a smoke test on a shared machine: no spinning thread team
    base = build_model("default", shape)  # torch.manual_seed(0) first
    accs = {}
    for name, on in (("off", False), ("on", True)):
        m = copy.deepcopy(base)
        accs[name] = Accumulator(m, torch.optim.AdamW(m.parameters(), lr=1e-4), noise_scale=on)
    g = torch.Generator().manual_seed(1)
    cycles = [[torch.randint(0, 256, (args.micro, shape.seq_len + 1), generator=g)
               for _ in range(args.k)] for _ in range(args.warmup + args.steps)]
    times = interleave({name: (lambda r, acc=acc: acc.step(cycles[r], loss))
                        for name, acc in accs.items()}, len(cycles))
    summary = summarize(times, args.warmup, "off")
    off, on = summary["seconds"]["off"], summary["seconds"]["on"]
    print(f"default GPT ({shape.n_layer} layers, width {shape.d_model}), K={args.k} "
          f"micro-batches of {args.micro} × {shape.seq_len} tokens, {torch.get_num_threads()} "
          f"threads, median of {args.steps} interleaved steps after {args.warmup}")
    print("| noise scale | s/step | ratio | median of per-step ratios |\n|---|---|---|---|")
    print(f"| off | {off:.4f} | 1.000 | 1.000 |")
    print(f"| on | {on:.4f} | {on / off:.3f} | {summary['paired_ratio']['on']:.3f} |")
    write_results(args, {
        "settings": {"steps": args.steps, "k": args.k, "micro": args.micro,
                     "warmup": args.warmup, "seq_len": shape.seq_len,
                     "model": {"n_layer": shape.n_layer, "d_model": shape.d_model}},
        "off_s": off, "on_s": on, "ratio": on / off,
        "paired_ratio": summary["paired_ratio"]["on"], "k": args.k, "micro": args.micro,
        "rounds": summary["rounds"]})
    return 0
