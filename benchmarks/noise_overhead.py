"""Time cost of measuring the gradient noise scale, on the default model.

    python benchmarks/noise_overhead.py [--steps 30] [--k 4] [--micro 8]

Two copies of the default GPT train on the same batches, one with ``noise_scale=True``, one
without, alternating step by step (A B A B …, the first 3 rounds discarded); the median seconds
per optimizer step of each and their ratio are printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from bigbatch import Accumulator
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.loss import token_cross_entropy

SEQ = 128


def loss(model, batch):
    return token_cross_entropy(model(batch[:, :-1]), batch[:, 1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/noise_overhead.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = GPT(GPTConfig(seq_len=SEQ))
    runs = {}
    for name, on in (("off", False), ("on", True)):
        m = copy.deepcopy(base)
        runs[name] = Accumulator(m, torch.optim.AdamW(m.parameters(), lr=1e-4), noise_scale=on)
    times: dict[str, list[float]] = {"off": [], "on": []}
    g = torch.Generator().manual_seed(1)
    for step in range(args.steps + 3):
        cycle = [torch.randint(0, 256, (args.micro, SEQ + 1), generator=g)
                 for _ in range(args.k)]
        for name, acc in runs.items():
            t0 = time.perf_counter()
            acc.step(cycle, loss)
            if step >= 3:
                times[name].append(time.perf_counter() - t0)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"default GPT, K={args.k} micro-batches of {args.micro} × {SEQ} tokens, median of "
          f"{args.steps} interleaved steps")
    print("| noise scale | s/step | ratio |\n|---|---|---|")
    print(f"| off | {off:.4f} | 1.000 |\n| on | {on:.4f} | {on / off:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"off_s": off, "on_s": on, "ratio": on / off,
                                           "k": args.k, "micro": args.micro}) + "\n")


if __name__ == "__main__":
    main()
