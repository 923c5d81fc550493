"""A byte-level transformer in Flax NNX, trained on the Python standard library's own source with
bigbatch's compiled JAX step: K micro-batches per optimizer step, exactly one full batch's update.

    pip install -e ".[jax]"
    python examples/jax_flax_lm.py                      # 300 steps, global batch 32 = 4 × 8 rows
    python examples/jax_flax_lm.py --budget-mib 150     # micro-batch: the largest whose step fits
    python examples/jax_flax_lm.py --short              # a few steps of a tiny model (a smoke test)

Each row is a window of 128 bytes from one source file drawn at random, starting anywhere in it,
so windows near a file's end are short and padded (label -100): the micro-batches hold different
numbers of real tokens, and the step divides the summed gradient by their total, once. Nothing is
downloaded: the text is the running interpreter's own ``.py`` files.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bigbatch.jax as bj

SKIP = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}


def stdlib_sources() -> list[bytes]:
    """Every ``.py`` file of the standard library (tests and installed packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP.intersection(p.relative_to(root).parts[:-1])
                   and not any(part.startswith("test_") for part in p.relative_to(root).parts))
    return [text for p in files if (text := p.read_bytes())]


def windows(docs: list[bytes], rows: int, seq: int, rng: np.random.Generator) -> dict[str, Any]:
    """``rows`` windows of ``seq + 1`` bytes, each from a document drawn at random, at a random
    start in it; the part past the document's end is padding (input 0, label -100)."""
    ids = np.zeros((rows, seq + 1), np.int32)
    keep = np.zeros((rows, seq + 1), bool)
    for r, i in enumerate(rng.integers(0, len(docs), rows)):
        start = rng.integers(0, len(docs[i]))
        piece = np.frombuffer(docs[i][start:start + seq + 1], np.uint8)
        ids[r, :len(piece)], keep[r, :len(piece)] = piece, True
    labels = np.where(keep[:, 1:], ids[:, 1:], bj.IGNORE_INDEX)
    return {"ids": ids[:, :-1], "labels": labels}


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs) -> None:
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class ByteLM(nnx.Module):
    def __init__(self, d: int, heads: int, layers: int, seq: int, rngs: nnx.Rngs) -> None:
        self.embed, self.pos = nnx.Embed(256, d, rngs=rngs), nnx.Embed(seq, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.embed(ids) + self.pos(jnp.arange(ids.shape[1]))
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.ln(x))  # tied input and output embeddings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--global-batch", type=int, default=32, help="rows per optimizer step")
    p.add_argument("--micro", type=int, default=8, help="rows per micro-batch (K = global/micro)")
    p.add_argument("--budget-mib", type=float, help="choose --micro: the largest micro-batch "
                   "(a divisor of the global batch) whose compiled step fits this many MiB")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--short", action="store_true", help="6 steps of a tiny model")
    args = p.parse_args()
    if args.short:
        args.steps, args.seq, args.width, args.layers = 6, 32, 32, 1
    if args.global_batch % args.micro:
        p.error(f"--micro {args.micro} must divide --global-batch {args.global_batch}")

    docs = stdlib_sources()
    train_docs, val_docs = [d for i, d in enumerate(docs) if i % 20], docs[::20]
    model = ByteLM(args.width, 4, args.layers, args.seq, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params: Any, batch: dict[str, Any]) -> bj.LossSum:
        logits = nnx.merge(graphdef, params, rest)(batch["ids"])
        return bj.token_cross_entropy(logits, batch["labels"])       # (sum, count)

    warmup = max(1, min(30, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(args.steps, warmup + 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95))
    opt_state = optimizer.init(params)
    step = bj.make_step(loss_fn, optimizer, donate=True)

    if args.budget_mib:
        def cycle_for(micro: int) -> Any:
            shapes = jax.ShapeDtypeStruct((args.global_batch // micro, micro, args.seq), jnp.int32)
            return {"ids": shapes, "labels": shapes}
        divisors = [m for m in range(1, args.global_batch + 1) if args.global_batch % m == 0]
        try:
            fit = bj.largest_micro_batch(step, params, opt_state, cycle_for,
                                         int(args.budget_mib * 2**20), divisors)
        except bj.BudgetError as err:
            raise SystemExit(f"jax_flax_lm.py: {err}") from None
        args.micro = fit.micro
        print(f"largest micro-batch within {args.budget_mib:g} MiB: {fit.micro} "
              f"(compiled step {fit.memory.peak / 2**20:.1f} MiB)")
    k = args.global_batch // args.micro
    print(f"{len(train_docs)} training files; {sum(x.size for x in jax.tree.leaves(params)):,} "
          f"parameters; global batch {args.global_batch} = K {k} × micro-batch {args.micro} rows "
          f"of {args.seq} bytes")

    rng = np.random.default_rng(0)
    micro_batches = (windows(train_docs, args.micro, args.seq, rng)
                     for _ in range(args.steps * k))
    t0 = time.perf_counter()
    for i, cycle in enumerate(bj.cycles(micro_batches, k), start=1):
        params, opt_state, stats = step(params, opt_state, cycle)
        if i == 1 or i % max(args.steps // 10, 1) == 0 or i == args.steps:
            print(f"step {i:4d}  loss {float(stats.loss):.4f} nats/byte  tokens {int(stats.count)}"
                  f"  grad norm {float(stats.grad_norm):.3f}"
                  f"{'  (skipped)' if bool(stats.skipped) else ''}")
    seconds = time.perf_counter() - t0

    val = windows(val_docs, 64, args.seq, np.random.default_rng(1))
    total, count = jax.jit(loss_fn)(params, val)
    print(f"validation loss {float(total / count):.4f} nats/byte (uniform: {np.log(256):.2f}); "
          f"{args.steps} steps in {seconds:.0f}s")


if __name__ == "__main__":
    main()
