"""Peak memory of one training configuration, in a process of its own.

    python -m benchmarks.fullbatch_child --model default --k 8 --global-batch 64 [--steps 2]

Run by ``python -m benchmarks`` (part 3) once per K, so no configuration inherits another's heap
or high-water mark. The model (``--shape n_layer,n_head,d_model,seq_len``) trains with
``Accumulator(model, AdamW, clip_grad_norm=1.0).step`` on global batches of ``--global-batch``
rows cut into K micro-batches of random bytes with labels cut at random lengths (memory depends
on the shapes, not on the text). One warm-up step creates AdamW's state and runs every kernel once;
then ``--steps`` measured steps:

* CPU (Linux): glibc's mmap threshold is fixed at 128 KiB first (``mallopt``), so every tensor of
  128 KiB or more has its own mapping, unmapped when freed, and the resident set follows the live
  tensors rather than what the heap keeps for reuse. Before the measured steps: ``gc.collect()``,
  ``malloc_trim(0)``, then ``5`` written to ``/proc/self/clear_refs`` resets the high-water mark;
  ``VmRSS`` then is *start*. After them ``VmHWM`` is the process's *peak RSS* (Python, libtorch,
  weights, optimizer state, batches and the step's activations, all included).
* CUDA: ``torch.cuda.reset_peak_memory_stats``; *start* is ``memory_allocated`` and the peak
  ``max_memory_allocated`` (tensors only, not the CUDA context).

Prints one JSON line: ``peak_bytes``, ``start_bytes``, ``increment_bytes`` (peak − start) and
``measure``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path
from typing import NoReturn

import torch

from .peer_methods import BigBatch, Shape, build_model, random_cycle

M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"python -m benchmarks.fullbatch_child: {message}\n")


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024  # "VmHWM:   223552 kB"
    raise RuntimeError(f"/proc/self/status has no {key}")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m benchmarks.fullbatch_child")
    p.add_argument("--model", required=True, choices=("default", "gpt2"))
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--shape", default="4,4,128,128", help="n_layer,n_head,d_model,seq_len")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.k < 1 or args.global_batch % args.k:
        p.error(f"--k {args.k} must divide --global-batch {args.global_batch}")
    try:
        shape = Shape(*(int(v) for v in args.shape.split(",")))
    except (TypeError, ValueError):
        p.error(f"--shape {args.shape!r} must be n_layer,n_head,d_model,seq_len")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    libc = None
    if not cuda:
        if not Path("/proc/self/clear_refs").exists():
            p.error("CPU peaks need Linux's /proc/self/clear_refs and VmHWM; use --device cuda")
        libc = _libc()
        if libc is None or libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
            p.error("the CPU measure needs glibc's mallopt")
    method = BigBatch(build_model(args.model, shape, args.seed).to(device))
    gen = torch.Generator().manual_seed(args.seed)
    micro = args.global_batch // args.k
    cycles = [random_cycle(args.k, micro, shape.seq_len, gen, device)
              for _ in range(args.steps + 1)]
    method.step(cycles[0])  # warm-up: optimizer state, kernels
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        libc.malloc_trim(0)  # type: ignore[union-attr]
        Path("/proc/self/clear_refs").write_text("5")
        start = _status_bytes("VmRSS")
    for cycle in cycles[1:]:
        method.step(cycle)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        measure = "CUDA max_memory_allocated"
    else:
        peak = _status_bytes("VmHWM")
        measure = "VmHWM, mmap threshold 128 KiB"
    print(json.dumps({"peak_bytes": peak, "start_bytes": start, "increment_bytes": peak - start,
                      "measure": measure}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
