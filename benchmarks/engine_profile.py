"""Where ``Accumulator.step`` spends time that the hand-written loop does not.

    python -m benchmarks engine_profile [--model tiny|default|gpt2] [--k 1,8] [--steps 200]
    python -m benchmarks engine_profile --model default --k 8 --steps 80 --warmup 4 --threads 2 \
        --costs 0 --profile 0 --loops hand,hand2,bigbatch,bigbatch-stop

Several loops train copies of one model on the same cycles, taking turns (A B C … per round,
the order rotating by one place each round, ``--warmup`` rounds discarded:
:func:`benchmarks._harness.interleave`), and the median seconds per optimizer step of each is
printed with its excess over the hand loop, per step and per micro-batch, and the median over
rounds of its time divided by the hand loop's in the same round. ``tiny`` (1 layer, width 32,
32-byte samples, micro-batches of 2 rows) makes the forward and backward nearly free, so what is
left is Python and bookkeeping: the engine's fixed costs, magnified.

* ``hand``: ``(mean loss / K).backward()`` per micro-batch, ``clip_grad_norm_``, step; ``hand2``
  the same again (an A/A check: its excess is the noise of the measurement);
* ``exact``: exact accumulation written out by hand as the engine first did it: backward on
  ``sum · c``, once per step the gradient multiplied by ``1 / (c · N)`` (``_foreach_mul_``),
  ``clip_grad_norm_``, step;
* ``exact-fused``: the same, but ``sum.backward(gradient=c)`` (no multiplication node) and the
  division by ``c · N`` folded into the clipping factor (one pass over the gradients, not two):
  the arithmetic the engine does now, and nothing else — the floor for the engine;
* ``bigbatch``: ``Accumulator(model, opt, clip_grad_norm=1.0)``, defaults (``oom="auto"``: in one
  process that is ``"split"``: :class:`bigbatch.engine.runner.SplitRunner`, with a
  post-accumulate-grad hook on every parameter);
* ``bigbatch-stop``: the same with ``oom="stop"`` (no hooks, no splitting bookkeeping;
  ``bigbatch-raise``, its old name, is accepted).

``--costs`` then times, one by one, the pieces of per-micro-batch and per-step work the engine
adds, on the default GPT's 48 parameter tensors and a 1 × 8-token micro-batch (so the forward
and backward cost little): the backward variants interleaved (medians of ``--costs`` runs), the
rest best of 5 repeats of the mean over ``--costs`` runs, in µs.

Then ``--profile`` steps of the default ``bigbatch`` under :mod:`cProfile`, and the functions of
``bigbatch`` (and the hook's ``list.append``) sorted by their own time, per micro-batch.
With two K values the excess is split into a per-step and a per-micro-batch part by a straight
line through the first and last K: ``excess(K) = a + b·K``. Results:
``benchmarks/results/engine_profile.json``.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._harness import choices, fill, int_list, interleave, parse, parser, summarize, write_results
from .peer_methods import (
    CLIP,
    FULL_SHAPE,
    QUICK_SHAPE,
    BigBatch,
    Corpus,
    HandLoop,
    build_model,
    clone,
    mean_loss,
    sum_loss,
)

LOOPS = ("hand", "hand2", "exact", "exact-fused", "bigbatch", "bigbatch-stop")
ALIASES = {"bigbatch-raise": "bigbatch-stop"}
FULL = {"k": "1,8", "steps": 200, "warmup": 5, "profile": 100, "costs": 200}
QUICK = {"k": "1,2", "steps": 2, "warmup": 1, "profile": 1, "costs": 2}


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


def _engine(model: torch.nn.Module, name: str, **options: Any) -> BigBatch:
    method = BigBatch(model, **options)
    method.name = name
    return method


def _best_us(fn: Callable[[], object], repeat: int) -> float:
    """Best of 5 of the mean time of ``repeat`` calls of ``fn``, in µs."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best * 1e6


def micro_costs(repeat: int) -> list[tuple[str, float]]:
    """µs of each piece of work the engine adds to a hand loop (see the module docstring)."""
    from bigbatch.batching import batch_rows
    from bigbatch.engine.precision import PrecisionPolicy
    from bigbatch.engine.runner import SplitRunner

    cpu = torch.device("cpu")
    model = build_model("default", FULL_SHAPE)
    params = list(model.parameters())
    batch = {"input_ids": torch.randint(0, 256, (1, 8)), "labels": torch.randint(0, 256, (1, 8))}
    out: list[tuple[str, float]] = []

    def fwd_bwd_mean() -> None:
        (mean_loss(model, batch) / 8).backward()

    def fwd_bwd_sum_mul() -> None:
        (sum_loss(model, batch).sum * 0.001).backward()

    policy = PrecisionPolicy("fp32", model, cpu)  # the engine's backward: seeded with c, cached

    def fwd_bwd_policy() -> None:
        policy.backward(sum_loss(model, batch).sum, 0.001)

    hooked = build_model("default", FULL_SHAPE)

    def run_micro(b: Any, loss_fn: Any, *, sync: bool, frozen: bool) -> None:
        (mean_loss(hooked, b) / 8).backward()

    # oom="split": a post-accumulate-grad hook per parameter, batch_rows, the piece's bookkeeping
    runner = SplitRunner(hooked, cpu, run_micro, [], regrow_after=100)

    def fwd_bwd_split() -> None:
        runner.run(batch, None, False)

    variants = {"mean": fwd_bwd_mean, "mul": fwd_bwd_sum_mul, "policy": fwd_bwd_policy,
                "split": fwd_bwd_split}
    # interleaved, so the machine's drift hits every variant alike
    times = interleave({name: (lambda r, fn=fn: fn()) for name, fn in variants.items()}, repeat)
    med = {name: us * 1e6 for name, us in summarize(times, 0)["seconds"].items()}
    out.append(("forward + (mean/K).backward(), 1 × 8 tokens (reference; interleaved medians)",
                med["mean"]))
    out.append(("  (sum · c).backward(): a Mul node (the engine's first version), excess",
                med["mul"] - med["mean"]))
    out.append(("  PrecisionPolicy.backward(sum, c): seeded, no Mul node (the engine), excess",
                med["policy"] - med["mean"]))
    out.append((f"  SplitRunner.run around it: {len(params)} post-accumulate-grad hooks, "
                "batch_rows (oom='split'), excess", med["split"] - med["mean"]))
    model.zero_grad(set_to_none=True)
    out.append(("batch_rows(batch) (oom='split', per micro-batch)",
                _best_us(lambda: batch_rows(batch, "batch"), repeat)))
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


def profile(name: str, shape: Any, micro: int, k: int, steps: int, corpus: Corpus,
            ) -> list[dict[str, Any]]:
    """``steps`` steps of the default engine under cProfile: bigbatch's functions (and the hook's
    ``list.append``) by own time, per micro-batch."""
    engine = _engine(clone(build_model(name, shape)), "bigbatch")
    cycles = corpus.cycles(steps + 2, k, micro)
    for cycle in cycles[:2]:
        engine.step(cycle)
    prof = cProfile.Profile()
    prof.enable()
    for cycle in cycles[2:]:
        engine.step(cycle)
    prof.disable()
    n_micro = steps * k
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.items():
        if "bigbatch" in file or func in ("<method 'append' of 'list' objects>",):
            where = f"{file.rsplit('/', 1)[-1]}:{line}({func})" if line else func
            rows.append({"own_us": tottime / n_micro * 1e6, "cum_us": cumtime / n_micro * 1e6,
                         "calls": calls / n_micro, "where": where})
    rows.sort(key=lambda r: r["own_us"], reverse=True)
    return rows[:15]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("engine_profile", __doc__)
    p.add_argument("--model", default="tiny", choices=("tiny", "default", "gpt2"))
    p.add_argument("--k", help=f"micro-batches per step, comma list (default {FULL['k']})")
    p.add_argument("--micro", type=int, help="rows per micro-batch (tiny: 2, else 8)")
    p.add_argument("--steps", type=int, help=f"timed rounds (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, help=f"discarded rounds (default {FULL['warmup']})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=int,
                   help=f"profiled steps (0: none; default {FULL['profile']})")
    p.add_argument("--costs", type=int,
                   help=f"runs per piece timed (0: none; default {FULL['costs']})")
    p.add_argument("--loops", default=",".join(LOOPS), help="comma list of: " + ", ".join(LOOPS))
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    ks = int_list(p, "--k", args.k)
    chosen = ["hand", *(n for n in choices(p, "--loops", args.loops, LOOPS, ALIASES)
                        if n != "hand")]  # the baseline always runs
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be at least 1, --warmup at least 0")
    torch.set_num_threads(args.threads)
    shape = QUICK_SHAPE if args.model == "tiny" else FULL_SHAPE
    micro = args.micro or (2 if args.model == "tiny" else 8)
    name = "default" if args.model == "tiny" else args.model
    corpus = Corpus(shape.seq_len)
    print(f"{args.model} model, micro-batches of {micro} rows, {args.threads} thread(s), median "
          f"of {args.steps} interleaved steps after {args.warmup}")
    print("| K | loop | µs/step | excess over hand µs/step | excess µs per micro-batch | "
          "× hand (median of per-round ratios) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for k in ks:
        base = build_model(name, shape)
        cycles = corpus.cycles(args.warmup + args.steps, k, micro)
        make = {"hand": HandLoop, "hand2": HandLoop, "exact": ExactHand, "exact-fused": ExactFused,
                "bigbatch": lambda m: _engine(m, "bigbatch"),
                "bigbatch-stop": lambda m: _engine(m, "bigbatch-stop", oom="stop")}
        loops = {n: make[n](clone(base)) for n in chosen}
        times = interleave({n: (lambda r, m=m, c=cycles: m.step(c[r])) for n, m in loops.items()},
                           len(cycles))
        summary = summarize(times, args.warmup, "hand")
        med = {n: t * 1e6 for n, t in summary["seconds"].items()}
        row: dict[str, Any] = {"k": k, "loops": {}}
        for n, us in med.items():
            excess = us - med["hand"]
            row["loops"][n] = {"us_per_step": us, "excess_us_per_step": excess,
                               "excess_us_per_micro_batch": excess / k,
                               "ratio": summary["ratio"][n],
                               "paired_ratio": summary["paired_ratio"][n]}
            print(f"| {k} | {n} | {us:.0f} | {excess:+.0f} | {excess / k:+.1f} | "
                  f"{summary['paired_ratio'][n]:.4f} |")
        row["rounds"] = summary["rounds"]
        rows.append(row)
    fit: dict[str, dict[str, float]] = {}
    if len(ks) >= 2:
        first, last = rows[0], rows[-1]
        k1, k2 = first["k"], last["k"]
        print(f"\nexcess over hand = a + b·K through K={k1} and K={k2}:")
        for n in chosen:
            e1 = first["loops"][n]["excess_us_per_step"]
            e2 = last["loops"][n]["excess_us_per_step"]
            b = (e2 - e1) / (k2 - k1)
            fit[n] = {"a_us_per_step": e1 - b * k1, "b_us_per_micro_batch": b}
            print(f"  {n:15s} a = {e1 - b * k1:+7.0f} µs per step, b = {b:+6.1f} µs per "
                  "micro-batch")
    costs = []
    if args.costs:
        print(f"\npieces of work, {args.threads} thread(s), {args.costs} runs each:")
        for what, us in micro_costs(args.costs):
            costs.append({"what": what.strip(), "us": us})
            print(f"  {us:8.1f} µs  {what}")
    prof = []
    if args.profile:
        prof = profile(name, shape, micro, ks[-1], args.profile, corpus)
        print(f"\ncProfile, bigbatch defaults, K={ks[-1]}, {args.profile} steps: own time per "
              "micro-batch (µs), calls per micro-batch")
        for r in prof:
            print(f"  {r['own_us']:7.1f} µs own  {r['cum_us']:8.1f} µs cum  "
                  f"{r['calls']:6.1f}×  {r['where']}")
    write_results(args, {
        "settings": {"model": args.model, "shape": shape.__dict__, "micro": micro, "k": ks,
                     "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                     "loops": chosen, "costs_runs": args.costs, "profile_steps": args.profile},
        "rows": rows, "fit": fit, "costs_us": costs, "profile": prof})
    return 0
