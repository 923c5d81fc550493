"""Gradient sync once per optimizer step vs after every micro-batch, on 2 ranks.

    python -m benchmarks sync [--steps 12] [--ks 1,4,16]
    python -m benchmarks sync --quick        # a tiny model, K = 2, 1 step: a smoke test

The command starts its own 2 processes (``torchrun --standalone --nproc-per-node 2``, gloo on
CPU, each rank with half the cores as torch threads); rank 0 prints the table and writes the
results. For each K, DDP and FSDP2 each train the default GPT (4 layers, width 128) on
micro-batches of 4 × 128 random bytes with two Accumulators on the same model, ``sync="cycle"``
and ``sync="micro"``, both ``oom="stop"`` (DDP's own overlapped sync in the last backward),
taking turns step by step (the order alternating each round, a barrier before each step:
:func:`benchmarks._harness.interleave`; the first two rounds discarded as warm-up); the table
gives median seconds per optimizer step, their ratio (and the median of per-step ratios), and the
gradient bytes each rank sends per step:

* DDP: counted in a communication hook (the size of every bucket all-reduced).
* FSDP2: its reduce-scatter input is the unsharded gradient of each sharded module, so bytes per
  sync = parameter bytes; counted per sync.

The memory side of FSDP2's two modes is arithmetic, not timing: with ``cycle`` each rank keeps
the unsharded gradient (P·4 bytes in float32) between micro-batches; with ``micro`` only its
shard (P·4/W).
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from bigbatch import Accumulator
from bigbatch.loss import LossSum, token_cross_entropy

from ._harness import (
    fill,
    int_list,
    interleave,
    parse,
    parser,
    summarize,
    torchrun,
    write_results,
)
from .peer_methods import FULL_SHAPE, QUICK_SHAPE, Shape, build_model

RANKS, MICRO, WARMUP = 2, 4, 2
FULL = {"steps": 12, "ks": "1,4,16"}
QUICK = {"steps": 1, "ks": "2"}
WORKER = "--worker"  # internal: this process is one of torchrun's ranks


def batches(k: int, step: int, rank: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    out = []
    for _ in range(k):
        ids = torch.randint(0, 256, (MICRO, seq_len + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def build(kind: str, sent: dict[str, int], shape: Shape) -> tuple[torch.nn.Module, int]:
    model = build_model("default", shape)  # torch.manual_seed(0) first: the same on every rank
    n_bytes = sum(p.numel() * p.element_size() for p in set(model.parameters()))
    if kind == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp = torch.nn.parallel.DistributedDataParallel(model)

        def hook(state, bucket):  # unannotated: DDP checks the annotations it finds
            sent["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
        return ddp, n_bytes
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, n_bytes


def run(kind: str, k: int, steps: int, shape: Shape) -> dict[str, Any]:
    rank = dist.get_rank()
    sent = {"bytes": 0}
    model, n_bytes = build(kind, sent, shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # oom="stop": DDP's own overlapped sync in the last backward (the default, oom="split", syncs
    # once in finish() instead, so that one rank may retry a micro-batch alone)
    accs = {mode: Accumulator(model, opt, sync=mode, oom="stop") for mode in ("cycle", "micro")}
    cycles = [batches(k, step, rank, shape.seq_len) for step in range(steps + WARMUP)]
    sent_per_step: dict[str, list[int]] = {"cycle": [], "micro": []}

    def timed(mode: str) -> Any:
        def step(r: int) -> None:
            sent["bytes"] = 0
            accs[mode].step(cycles[r], loss)
            sent_per_step[mode].append(sent["bytes"])
        return step

    times = interleave({mode: timed(mode) for mode in accs}, len(cycles), before=dist.barrier)
    summary = summarize(times, WARMUP, "cycle")
    med = summary["seconds"]
    syncs = {"cycle": 1, "micro": k}
    sent_bytes = {mode: (statistics.median(b[WARMUP:]) if kind == "ddp" else syncs[mode] * n_bytes)
                  for mode, b in sent_per_step.items()}
    return {"kind": kind, "k": k, "cycle_s": med["cycle"], "micro_s": med["micro"],
            "ratio": med["micro"] / med["cycle"],
            "paired_ratio": summary["paired_ratio"]["micro"],
            "cycle_bytes": sent_bytes["cycle"], "micro_bytes": sent_bytes["micro"],
            "grad_bytes_unsharded": n_bytes,
            "grad_bytes_shard": n_bytes / dist.get_world_size(),
            "rounds": summary["rounds"]}


def worker(args: Any) -> None:
    """One rank: every kind and K; rank 0 prints and writes the results."""
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    rows = [run(kind, k, args.steps, shape) for kind in ("ddp", "fsdp2") for k in args.ks]
    if dist.get_rank() == 0:
        mib = 2**20
        print(f"{dist.get_world_size()} ranks (gloo, {os.cpu_count()} CPU cores, "
              f"{torch.get_num_threads()} threads each), GPT {shape.n_layer}×{shape.d_model}, "
              f"micro-batch {MICRO} × {shape.seq_len} tokens, median of {args.steps} "
              f"interleaved steps after {WARMUP}\n")
        print("| wrapper | K | s/step, sync once | s/step, sync every micro-batch | ratio | "
              "MiB sent/step, once | MiB sent/step, every |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['kind']} | {r['k']} | {r['cycle_s']:.3f} | {r['micro_s']:.3f} | "
                  f"{r['ratio']:.2f}× | {r['cycle_bytes'] / mib:.1f} | "
                  f"{r['micro_bytes'] / mib:.1f} |")
        r = rows[-1]
        print(f"\nFSDP2 gradient memory held between micro-batches per rank: "
              f"{r['grad_bytes_unsharded'] / mib:.1f} MiB with sync once (unsharded), "
              f"{r['grad_bytes_shard'] / mib:.1f} MiB with sync every micro-batch (shard)",
              flush=True)
        write_results(args, {
            "settings": {"steps": args.steps, "warmup": WARMUP, "ks": args.ks, "micro": MICRO,
                         "seq_len": shape.seq_len, "ranks": dist.get_world_size(),
                         "backend": "gloo",
                         "model": {"n_layer": shape.n_layer, "d_model": shape.d_model}},
            "rows": rows})
    dist.barrier()
    gc.collect()  # DDP/FSDP2 objects hold the group; see bigbatch.launch.Ranks.close
    dist.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    is_worker = WORKER in argv
    argv = [a for a in argv if a != WORKER]
    p = parser("sync", __doc__)
    p.add_argument("--steps", type=int,
                   help=f"timed steps per mode and K (default {FULL['steps']})")
    p.add_argument("--ks", help=f"accumulation steps K to try (default {FULL['ks']})")
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    args.ks = [int(k) for k in args.ks.split(",")] if is_worker else int_list(p, "--ks", args.ks)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if is_worker:
        worker(args)
    else:
        if not dist.is_available():
            p.error("this torch has no torch.distributed")
        torchrun("sync", [WORKER, *argv], RANKS, max(1, (os.cpu_count() or 2) // RANKS))
    return 0
