"""Cost of a mid-cycle checkpoint of the default GPT (AdamW state included), vs a micro-batch.

    python -m benchmarks checkpoint_cost [--repeats 5]
    python -m benchmarks checkpoint_cost --quick     # a tiny model, 2 repeats: a smoke test

The default ``bigbatch train`` model (4 layers, width 128, 128-byte samples) with AdamW and a
learning-rate scheduler takes one step of two 8 × 128-token micro-batches (so AdamW's state
exists), then accumulates one more micro-batch: a cycle is in flight, and its partial gradient
is part of the checkpoint. ``bigbatch train``'s checkpoint writer
(:func:`bigbatch.app.checkpoint.save_checkpoint` of :func:`bigbatch.app.runstate.capture`,
keeping 3) then saves ``--repeats`` checkpoints (median time), each loaded back and verified
(:func:`~bigbatch.app.checkpoint.load_checkpoint`, median time); one more 8 × 128-token
micro-batch is timed, so ``--save-every-micro`` can be priced.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bigbatch import Accumulator
from bigbatch.app.checkpoint import load_checkpoint, save_checkpoint
from bigbatch.app.runstate import Position, capture, checkpoint_name
from bigbatch.loss import LossSum, token_cross_entropy

from ._harness import fill, parse, parser, write_results
from .peer_methods import FULL_SHAPE, QUICK_SHAPE, build_model, make_optimizer

FULL = {"repeats": 5}
QUICK = {"repeats": 2}
MICRO = 8


def loss(model: torch.nn.Module, batch: torch.Tensor) -> LossSum:
    return token_cross_entropy(model(batch[:, :-1]), batch[:, 1:])


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("checkpoint_cost", __doc__)
    p.add_argument("--repeats", type=int,
                   help=f"checkpoints saved and loaded (median; default {FULL['repeats']})")
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    if args.quick:
        torch.set_num_threads(1)
    model = build_model("default", shape)
    opt = make_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    acc = Accumulator(model, opt, scheduler=sched)
    ids = torch.randint(0, 256, (MICRO, shape.seq_len + 1),
                        generator=torch.Generator().manual_seed(0))
    acc.step([ids, ids], loss)  # optimizer state exists
    acc.accumulate(ids, loss)  # a cycle in flight: the partial gradient is saved too
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.repeats):
            t0 = time.perf_counter()
            path = save_checkpoint(root, checkpoint_name(1, i + 1),
                                   capture(Position(1, i + 1, 0), model, opt, sched, acc), keep=3)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            load_checkpoint(path)
            loads.append(time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in path.iterdir())
    t0 = time.perf_counter()
    acc.accumulate(ids, loss)
    micro = time.perf_counter() - t0
    save, load = statistics.median(saves), statistics.median(loads)
    print(f"checkpoint {size / 2**20:.1f} MiB: save {save * 1e3:.0f} ms, load and verify "
          f"{load * 1e3:.0f} ms; one {MICRO} × {shape.seq_len} micro-batch {micro * 1e3:.0f} ms")
    write_results(args, {
        "settings": {"repeats": args.repeats, "micro": MICRO, "seq_len": shape.seq_len,
                     "model": {"n_layer": shape.n_layer, "d_model": shape.d_model}},
        "checkpoint_bytes": size, "save_s": save, "load_verify_s": load,
        "micro_batch_s": micro, "save_over_micro_batch": save / micro,
        "save_each_s": saves, "load_each_s": loads})
    return 0
