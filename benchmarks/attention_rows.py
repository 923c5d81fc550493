"""Attention over padding-free rows: which way to keep each sample to itself is fastest here.

    flock /tmp/bench.lock python -m benchmarks attention_rows [--rows 4] [--width 1024]
        [--rounds 8] [--quick]

Rows of ``--width`` columns, each holding 8 samples (lengths 300, 200, 180, 120, 100, 60, 40, 24
scaled to the width, the rest of the row one more sample), attention with 4 heads of 32
dimensions, forward and backward (float32, CPU). Ways, interleaved round by round
(:func:`benchmarks._harness.interleave`, the first round discarded, medians):

* ``dense mask``: one ``scaled_dot_product_attention`` call with the block-diagonal causal mask
  (:func:`bigbatch.app.models.gpt.document_mask`; the built-in GPT's CUDA path);
* ``per sample``: one causal call per sample (:func:`~bigbatch.app.models.gpt.document_spans`;
  the built-in GPT's CPU path), the real block of the GPT in both;
* ``causal, no mask``: plain causal attention over the whole row — wrong (samples see each
  other), shown as the cost of attention with no document structure;
* ``flex``, ``nested``: ``torch.nn.attention.flex_attention`` with a document mask and nested
  (jagged) tensors, each reported as the error it raises where it cannot run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bigbatch.app.models.gpt import document_mask, document_spans

from ._harness import interleave, log, parse, parser, write_results

LENGTHS = (300, 200, 180, 120, 100, 60, 40, 24)
HEADS, DIM = 4, 32


def positions(rows: int, width: int) -> torch.Tensor:
    scale = width / 1024
    lengths = [max(1, round(n * scale)) for n in LENGTHS]
    lengths.append(width - sum(lengths))
    row = torch.cat([torch.arange(n) for n in lengths if n > 0])
    return row[None].expand(rows, -1).contiguous()


def ways(pos: torch.Tensor) -> dict[str, Callable[[Any, Any, Any], torch.Tensor]]:
    mask, spans = document_mask(pos), document_spans(pos)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def per_sample(q, k, v):
        return torch.stack([torch.cat([
            F.scaled_dot_product_attention(q[r:r + 1, :, o:o + n], k[r:r + 1, :, o:o + n],
                                           v[r:r + 1, :, o:o + n], is_causal=True)[0]
            for o, n in row], dim=1) for r, row in enumerate(spans)])

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def flex(q, k, v):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        seg = (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)
        block = create_block_mask(lambda b, h, i, j: (seg[b, i] == seg[b, j]) & (i >= j),
                                  pos.shape[0], None, pos.shape[1], pos.shape[1], device="cpu")
        return flex_attention(q, k, v, block_mask=block)

    def nested(q, k, v):
        lengths = [n for row in spans for _, n in row]
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])

        def jag(x):
            values = x.transpose(1, 2).reshape(-1, HEADS, DIM)
            return torch.nested.nested_tensor_from_jagged(values, offsets).transpose(1, 2)

        return F.scaled_dot_product_attention(jag(q), jag(k), jag(v), is_causal=True).values()

    return {"dense mask": dense, "per sample": per_sample, "causal, no mask": causal,
            "flex": flex, "nested": nested}


def inputs(rows: int, width: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, HEADS, width, DIM, generator=g).requires_grad_() for _ in range(3)]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("attention_rows", __doc__)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (one more is discarded)")
    args = parse(p, argv)
    if args.quick:
        args.rows, args.width, args.rounds = 2, 128, 2
    if args.rows < 1 or args.width < 64 or args.rounds < 1:
        p.error("--rows >= 1, --width >= 64 and --rounds >= 1")
    pos = positions(args.rows, args.width)
    candidates, failed = {}, {}
    for name, fn in ways(pos).items():  # one untimed try: a way that cannot run is reported
        try:
            fn(*inputs(args.rows, args.width, 0)).sum().backward()
            candidates[name] = fn
        except (RuntimeError, NotImplementedError) as err:
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            log(f"{name}: {failed[name]}")

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[int], None]:
        def run(r: int) -> None:
            fn(*inputs(args.rows, args.width, r)).sum().backward()
        return run

    times = interleave({n: step(f) for n, f in candidates.items()}, args.rounds + 1,
                       label="  attention")
    ms = {n: statistics.median(t[1:]) * 1e3 for n, t in times.items()}
    base = ms.get("dense mask")
    print(f"{args.rows} rows × {args.width} columns, {len(LENGTHS) + 1} samples per row, "
          f"{HEADS} heads × {DIM}, forward + backward, median of {args.rounds} rounds\n")
    print("| way | ms | × dense mask |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f}× |" if base else f"| {name} | "
              f"{value:.1f} | — |")
    for name, why in failed.items():
        print(f"| {name} | cannot run: {why} | — |")
    write_results(args, {"settings": {"rows": args.rows, "width": args.width,
                                      "rounds": args.rounds, "heads": HEADS, "dim": DIM},
                         "ms": ms, "failed": failed,
                         "rounds_seconds": {n: t for n, t in times.items()}})
    return 0
