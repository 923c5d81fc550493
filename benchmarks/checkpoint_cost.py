"""Cost of a mid-cycle checkpoint of the default GPT (AdamW state included), vs a micro-batch.

    python benchmarks/checkpoint_cost.py

Saves five checkpoints in the middle of a cycle (median time), loads and verifies one (median of
five), and times one 8 × 128-token micro-batch, so ``--save-every-micro`` can be priced.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bigbatch.app.checkpoint import load_checkpoint, save_checkpoint
from bigbatch.app.config import TrainConfig
from bigbatch.app.runstate import Position, capture, checkpoint_name
from bigbatch.app.workload import build_model, make_optimizer, make_scheduler
from bigbatch.engine import Accumulator
from bigbatch.loss import token_cross_entropy


def loss(model, batch):
    return token_cross_entropy(model(batch[:, :-1]), batch[:, 1:])


def main() -> None:
    cfg = TrainConfig(device="cpu")
    model = build_model(cfg, torch.device("cpu"))
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    acc = Accumulator(model, opt, scheduler=sched)
    ids = torch.randint(0, 256, (8, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    acc.step([ids, ids], loss)  # optimizer state exists
    acc.accumulate(ids, loss)  # a cycle in flight: the partial gradient is saved too
    root = Path(tempfile.mkdtemp())
    saves, loads = [], []
    for i in range(5):
        t0 = time.perf_counter()
        path = save_checkpoint(root, checkpoint_name(1, i + 1),
                               capture(Position(1, i + 1, 0), model, opt, sched, acc), keep=3)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        load_checkpoint(path)
        loads.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    acc.accumulate(ids, loss)
    micro = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"checkpoint {size / 2**20:.1f} MiB: save {statistics.median(saves) * 1e3:.0f} ms, "
          f"load and verify {statistics.median(loads) * 1e3:.0f} ms; one 8 × {cfg.seq_len} "
          f"micro-batch {micro * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
