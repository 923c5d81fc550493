"""Peak memory of one training configuration, in a process of its own.

    python -m benchmarks fullbatch_child --model default --k 8 --global-batch 64 [--steps 2]

Internal (not listed): run by ``python -m benchmarks peers`` (part 3) once per K, so no
configuration inherits another's heap or high-water mark. The model (``--shape
n_layer,n_head,d_model,seq_len``) trains with ``Accumulator(model, AdamW,
clip_grad_norm=1.0).step`` on global batches of ``--global-batch`` rows cut into K micro-batches
of random bytes with labels cut at random lengths (memory depends on the shapes, not on the
text). One warm-up step creates AdamW's state and runs every kernel once; then ``--steps``
measured steps:

* CPU (Linux): glibc's mmap threshold is fixed at 128 KiB first (``mallopt``), so every tensor of
  128 KiB or more has its own mapping, unmapped when freed, and the resident set follows the live
  tensors rather than what the heap keeps for reuse. Before the measured steps: ``gc.collect()``,
  ``malloc_trim(0)``, then ``5`` written to ``/proc/self/clear_refs`` resets the high-water mark
  (:func:`benchmarks._harness.reset_cpu_peak`); ``VmRSS`` then is *start*. After them ``VmHWM``
  is the process's *peak RSS* (Python, libtorch, weights, optimizer state, batches and the
  step's activations, all included).
* CUDA: ``torch.cuda.reset_peak_memory_stats``; *start* is ``memory_allocated`` and the peak
  ``max_memory_allocated`` (tensors only, not the CUDA context).

Prints one JSON line (:func:`benchmarks._harness.reply`): ``peak_bytes``, ``start_bytes``,
``increment_bytes`` (peak − start) and ``measure``.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch

from ._harness import (
    check_cpu_peaks,
    cpu_peak,
    fix_mmap_threshold,
    parse,
    parser,
    reply,
    reset_cpu_peak,
)
from .peer_methods import BigBatch, Shape, build_model, random_cycle


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("fullbatch_child", __doc__, results=False)
    p.add_argument("--model", required=True, choices=("default", "gpt2"))
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--shape", default="4,4,128,128", help="n_layer,n_head,d_model,seq_len")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = parse(p, argv)
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
    if not cuda:
        check_cpu_peaks()
        fix_mmap_threshold()
    method = BigBatch(build_model(args.model, shape, args.seed).to(device))
    gen = torch.Generator().manual_seed(args.seed)
    micro = args.global_batch // args.k
    cycles = [random_cycle(args.k, micro, shape.seq_len, gen, device)
              for _ in range(args.steps + 1)]
    method.step(cycles[0])  # warm-up: optimizer state, kernels
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        start = reset_cpu_peak()
    for cycle in cycles[1:]:
        method.step(cycle)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        measure = "CUDA max_memory_allocated"
    else:
        peak = cpu_peak()
        measure = "VmHWM, mmap threshold 128 KiB"
    reply({"peak_bytes": peak, "start_bytes": start, "increment_bytes": peak - start,
           "measure": measure})
    return 0
