"""Where ``Accumulator.step`` spends time that the hand-written loop does not.

    python -m benchmarks.engine_profile [--model tiny|default|gpt2] [--k 1,8] [--steps 200]

Several loops train copies of one model on the same cycles, taking turns (A B C … per round,
the order rotating by one place each round, ``--warmup`` rounds discarded), and the median
seconds per optimizer step of each is printed with its excess over the hand loop, per step and
per micro-batch. ``tiny`` (1 layer, width 32, 32-byte samples, micro-batches of 2 rows) makes
the forward and backward nearly free, so what is left is Python and bookkeeping: the engine's
fixed costs, magnified.

* ``hand``: ``(mean loss / K).backward()`` per micro-batch, ``clip_grad_norm_``, step; ``hand2``
  the same again (an A/A check: its excess is the noise of the measurement);
* ``exact``: exact accumulation written out by hand as the engine first did it: backward on
  ``sum · c``, once per step the gradient multiplied by ``1 / (c · N)`` (``_foreach_mul_``),
  ``clip_grad_norm_``, step;
* ``exact-fused``: the same, but ``sum.backward(gradient=c)`` (no multiplication node) and the
  division by ``c · N`` folded into the clipping factor (one pass over the gradients, not two):
  the arithmetic the engine does now, and nothing else — the floor for the engine;
* ``bigbatch``: ``Accumulator(model, opt, clip_grad_norm=1.0)``, defaults (``oom="auto"``: in one
  process that is ``"split"``, with a post-accumulate-grad hook on every parameter);
* ``bigbatch-raise``: the same with ``oom="raise"`` (no hooks, no splitting bookkeeping).

``--costs`` then times, one by one, the pieces of per-micro-batch and per-step work the engine
adds, on the default GPT's 48 parameter tensors and a 1 × 8-token micro-batch (so the forward
and backward cost little): best of 5 repeats of the mean over ``--repeat`` runs, in µs.

Then ``--profile`` steps of the default ``bigbatch`` under :mod:`cProfile`, and the functions of
``bigbatch`` (and the hook's ``list.append``) sorted by their own time, per micro-batch.
With two K values the excess is split into a per-step and a per-micro-batch part by a straight
line through the two points: ``excess(K) = a + b·K``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from typing import NoReturn

import torch

from bigbatch import Accumulator

from .peer_methods import (
    CLIP,
    FULL_SHAPE,
    QUICK_SHAPE,
    Corpus,
    HandLoop,
    Method,
    build_model,
    clone,
    make_optimizer,
    mean_loss,
    sum_loss,
)

LOOPS = ("hand", "hand2", "exact", "exact-fused", "bigbatch", "bigbatch-raise")


class ExactHand(HandLoop):
    """Exact accumulation by hand, as the engine first did it: ``sum · c`` backward, one
    rescale, clip, step."""

    name = "exact"
    seeded = False  # backward on sum · c (a multiplication node), or seeded with c

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.c: float | None = None

    def accumulate(self, cycle: list) -> tuple[list[torch.Tensor], int]:
        """Backward on every micro-batch's prescaled sum; the gradients and the item count."""
        count = torch.zeros((), dtype=torch.int64)
        for batch in cycle:
            ls = sum_loss(self.model, batch)
            if self.c is None:
                self.c = 1.0 / (int(ls.count) * len(cycle))
            if self.seeded:
                ls.sum.backward(torch.full((), self.c, dtype=ls.sum.dtype))
            else:
                (ls.sum * self.c).backward()
            count += ls.count
        return [p.grad for p in self.model.parameters() if p.grad is not None], int(count)

    def step(self, cycle: list) -> None:
        grads, n = self.accumulate(cycle)
        torch._foreach_mul_(grads, 1.0 / (self.c * n))
        self.c = 1.0 / n
        self.apply()


class ExactFused(ExactHand):
    """As :class:`ExactHand`, with the division by ``c · N`` folded into the clipping factor.

    ``‖g / s‖ = ‖g‖ / s``, so the norm of the raw accumulated gradient gives the normalized
    one, and one ``_foreach_mul_`` by ``min(1, max_norm / (‖g‖/s + 1e-6)) / s`` both normalizes
    and clips: one pass over the gradients per step instead of two.
    """

    name = "exact-fused"
    seeded = True  # no multiplication node

    def step(self, cycle: list) -> None:
        grads, n = self.accumulate(cycle)
        scale = self.c * n  # the accumulated gradient is scale × the normalized one
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) / scale
        coef = torch.clamp(CLIP / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef / scale)
        self.c = 1.0 / n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Engine(Method):
    def __init__(self, model: torch.nn.Module, name: str, **options: object) -> None:
        super().__init__(model)
        self.name = name
        self.acc = Accumulator(model, make_optimizer(model), clip_grad_norm=CLIP, **options)

    def step(self, cycle: list) -> None:
        self.acc.step(cycle, sum_loss)


def _best_us(fn: object, repeat: int) -> float:
    """Best of 5 of the mean time of ``repeat`` calls of ``fn``, in µs."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()  # type: ignore[operator]
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e6


def micro_costs(repeat: int) -> list[tuple[str, float]]:
    """µs of each piece of work the engine adds to a hand loop (see the module docstring)."""
    from bigbatch.batching import batch_rows as _rows

    model = build_model("default", FULL_SHAPE)
    params = list(model.parameters())
    batch = {"input_ids": torch.randint(0, 256, (1, 8)), "labels": torch.randint(0, 256, (1, 8))}
    out: list[tuple[str, float]] = []

    def fwd_bwd_mean() -> None:
        (mean_loss(model, batch) / 8).backward()

    def fwd_bwd_sum_mul() -> None:
        (sum_loss(model, batch).sum * 0.001).backward()

    seed = torch.tensor(0.001)

    def fwd_bwd_sum_seed() -> None:
        sum_loss(model, batch).sum.backward(seed)

    touched: list[torch.Tensor] = []
    hooked = build_model("default", FULL_SHAPE)
    for p in hooked.parameters():
        p.register_post_accumulate_grad_hook(touched.append)

    def fwd_bwd_hooks() -> None:
        (mean_loss(hooked, batch) / 8).backward()
        touched.clear()

    variants = {"mean": fwd_bwd_mean, "mul": fwd_bwd_sum_mul, "seed": fwd_bwd_sum_seed,
                "hooks": fwd_bwd_hooks}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):  # interleaved, so the machine's drift hits every variant alike
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    out.append(("forward + (mean/K).backward(), 1 × 8 tokens (reference; interleaved medians)",
                med["mean"]))
    out.append(("  LossSum: backward of sum · c (engine today), excess",
                med["mul"] - med["mean"]))
    out.append(("  LossSum: sum.backward(gradient=c) (no Mul node), excess",
                med["seed"] - med["mean"]))
    out.append((f"  {len(params)} post-accumulate-grad hooks (oom='split'), excess",
                med["hooks"] - med["mean"]))
    model.zero_grad(set_to_none=True)
    out.append(("_rows(batch) (oom='split', per micro-batch)",
                _best_us(lambda: _rows(batch, "batch"), repeat)))
    ls = sum_loss(model, batch)
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.int64)
    out.append(("loss_sum + sum.detach().to(float64) (per micro-batch)",
                _best_us(lambda: total + ls.sum.detach().to(total.device, torch.float64),
                         repeat)))
    out.append(("count + ls.count, tensors (per micro-batch)",
                _best_us(lambda: count + ls.count, repeat)))
    parts: list[torch.Tensor] = []
    out.append(("list.append(sum.detach()) instead (per micro-batch)",
                _best_us(lambda: parts.append(ls.sum.detach()), repeat)))
    out.append(("model.zero_grad(set_to_none=True), grads already None (per step)",
                _best_us(lambda: model.zero_grad(set_to_none=True), repeat)))
    grads = [torch.ones_like(p) for p in params]
    out.append(("torch._foreach_mul_(grads, 1/(c·N)) (per step)",
                _best_us(lambda: torch._foreach_mul_(grads, 1.0), repeat)))
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"python -m benchmarks.engine_profile: {message}\n")


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m benchmarks.engine_profile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=("tiny", "default", "gpt2"))
    p.add_argument("--k", default="1,8")
    p.add_argument("--micro", type=int, help="rows per micro-batch (tiny: 2, else 8)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=int, default=100, help="profiled steps (0: none)")
    p.add_argument("--costs", type=int, default=200, help="runs per piece timed (0: none)")
    p.add_argument("--loops", default=",".join(LOOPS), help="comma list of: " + ", ".join(LOOPS))
    args = p.parse_args(argv)
    try:
        ks = [int(v) for v in args.k.split(",")]
    except ValueError:
        p.error(f"--k {args.k!r} is not a comma list of integers")
    chosen = {"hand", *(v.strip() for v in args.loops.split(","))}
    if chosen - set(LOOPS):
        p.error(f"--loops {args.loops!r}: choose from {', '.join(LOOPS)}")
    torch.set_num_threads(args.threads)
    shape = QUICK_SHAPE if args.model == "tiny" else FULL_SHAPE
    micro = args.micro or (2 if args.model == "tiny" else 8)
    name = "default" if args.model == "tiny" else args.model
    corpus = Corpus(shape.seq_len)
    excess: dict[str, dict[int, float]] = {}
    print(f"{args.model} model, micro-batches of {micro} rows, {args.threads} thread(s), median "
          f"of {args.steps} interleaved steps after {args.warmup}")
    print("| K | loop | µs/step | excess over hand µs/step | excess µs per micro-batch |")
    print("|---|---|---|---|---|")
    for k in ks:
        base = build_model(name, shape)
        cycles = corpus.cycles(args.warmup + args.steps, k, micro)
        hand2 = HandLoop(clone(base))
        hand2.name = "hand2"
        loops = [HandLoop(clone(base)), hand2, ExactHand(clone(base)), ExactFused(clone(base)),
                 Engine(clone(base), "bigbatch"),
                 Engine(clone(base), "bigbatch-raise", oom="raise")]
        loops = [m for m in loops if m.name in chosen]
        times: dict[str, list[float]] = {m.name: [] for m in loops}
        for r, cycle in enumerate(cycles):
            for m in loops[r % len(loops):] + loops[:r % len(loops)]:  # rotate: no fixed places
                t0 = time.perf_counter()
                m.step(cycle)
                times[m.name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t[args.warmup:]) * 1e6 for n, t in times.items()}
        for n, us in med.items():
            excess.setdefault(n, {})[k] = us - med["hand"]
            print(f"| {k} | {n} | {us:.0f} | {us - med['hand']:+.0f} | "
                  f"{(us - med['hand']) / k:+.1f} |")
    if len(ks) >= 2:
        k1, k2 = ks[0], ks[-1]
        print(f"\nexcess over hand = a + b·K through K={k1} and K={k2}:")
        for n, e in excess.items():
            b = (e[k2] - e[k1]) / (k2 - k1)
            print(f"  {n:15s} a = {e[k1] - b * k1:+7.0f} µs per step, b = {b:+6.1f} µs per "
                  "micro-batch")
    if args.costs:
        print(f"\npieces of work, {args.threads} thread(s), best of 5 means of {args.costs} runs:")
        for what, us in micro_costs(args.costs):
            print(f"  {us:8.1f} µs  {what}")
    if args.profile:
        k = ks[-1]
        base = build_model(name, shape)
        engine = Engine(clone(base), "bigbatch")
        cycles = corpus.cycles(args.profile + 2, k, micro)
        for cycle in cycles[:2]:
            engine.step(cycle)
        prof = cProfile.Profile()
        prof.enable()
        for cycle in cycles[2:]:
            engine.step(cycle)
        prof.disable()
        n_micro = args.profile * k
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        rows = []
        for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.items():
            if "bigbatch" in file or func in ("<method 'append' of 'list' objects>",):
                where = f"{file.rsplit('/', 1)[-1]}:{line}({func})" if line else func
                rows.append((tottime, cumtime, calls, where))
        rows.sort(reverse=True)
        print(f"\ncProfile, bigbatch defaults, K={k}, {args.profile} steps: own time per "
              "micro-batch (µs), calls per micro-batch")
        for tottime, cumtime, calls, where in rows[:15]:
            print(f"  {tottime / n_micro * 1e6:7.1f} µs own  {cumtime / n_micro * 1e6:8.1f} µs "
                  f"cum  {calls / n_micro:6.1f}×  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
