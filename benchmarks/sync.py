"""Gradient sync once per optimizer step vs after every micro-batch, on 2 ranks.

    torchrun --standalone --nproc-per-node 2 benchmarks/sync.py [--steps 12] [--ks 1,4,16]

For each K, DDP and FSDP2 each train the default GPT (4 layers, width 128) with two
Accumulators on the same model, ``sync="cycle"`` and ``sync="micro"``, alternating step by step
(A B A B …, the first two rounds discarded as warm-up); the table gives median seconds per
optimizer step, their ratio, and the gradient bytes each rank sends per step:

* DDP: counted in a communication hook (the size of every bucket all-reduced).
* FSDP2: its reduce-scatter input is the unsharded gradient of each sharded module, so bytes per
  sync = parameter bytes; counted per sync.

The memory side of FSDP2's two modes is arithmetic, not timing: with ``cycle`` each rank keeps
the unsharded gradient (P·4 bytes in float32) between micro-batches; with ``micro`` only its
shard (P·4/W).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from bigbatch import Accumulator
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.loss import token_cross_entropy

SEQ, MICRO = 128, 4


def batches(k: int, step: int, rank: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    out = []
    for _ in range(k):
        ids = torch.randint(0, 256, (MICRO, SEQ + 1), generator=g)
        out.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    return out


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def build(kind: str, sent: dict[str, int]) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=SEQ))
    n_bytes = sum(p.numel() * p.element_size() for p in set(model.parameters()))
    if kind == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)

        def hook(state, bucket):
            sent["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
        return ddp, n_bytes
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, n_bytes


def run(kind: str, k: int, steps: int) -> dict[str, float]:
    rank = dist.get_rank()
    sent = {"bytes": 0}
    model, n_bytes = build(kind, sent)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # oom="raise": DDP's own overlapped sync in the last backward (the default, oom="split", syncs
    # once in finish() instead, so that one rank may retry a micro-batch alone)
    accs = {mode: Accumulator(model, opt, sync=mode, oom="raise") for mode in ("cycle", "micro")}
    times: dict[str, list[float]] = {"cycle": [], "micro": []}
    bytes_per_step: dict[str, list[int]] = {"cycle": [], "micro": []}
    for step in range(steps + 2):
        for mode, acc in accs.items():
            micro = batches(k, step, rank)
            sent["bytes"] = 0
            dist.barrier()
            t0 = time.perf_counter()
            acc.step(micro, loss)
            elapsed = time.perf_counter() - t0
            if step >= 2:  # the first two rounds warm up
                times[mode].append(elapsed)
                syncs = 1 if mode == "cycle" else k
                bytes_per_step[mode].append(sent["bytes"] if kind == "ddp" else syncs * n_bytes)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"kind": kind, "k": k, "cycle_s": med["cycle"], "micro_s": med["micro"],
            "ratio": med["micro"] / med["cycle"],
            "cycle_bytes": statistics.median(bytes_per_step["cycle"]),
            "micro_bytes": statistics.median(bytes_per_step["micro"]),
            "grad_bytes_unsharded": n_bytes,
            "grad_bytes_shard": n_bytes / dist.get_world_size()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode and K")
    parser.add_argument("--ks", default="1,4,16", help="accumulation steps K to try")
    parser.add_argument("--json", default="benchmarks/results/sync.json")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    rows = [run(kind, int(k), args.steps) for kind in ("ddp", "fsdp2")
            for k in args.ks.split(",")]
    if dist.get_rank() == 0:
        mib = 2**20
        print(f"2 ranks (gloo, {os.cpu_count()} CPU cores), default GPT, micro-batch {MICRO} × "
              f"{SEQ} tokens, median of {args.steps} interleaved steps\n")
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
              f"{r['grad_bytes_shard'] / mib:.1f} MiB with sync every micro-batch (shard)")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    dist.barrier()
    gc.collect()  # DDP/FSDP2 objects hold the group; see bigbatch.launch.Ranks.close
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
