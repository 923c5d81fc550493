"""JAX: the compiled exact step vs a hand-written lax.scan, optax.MultiSteps and the full batch.

    python -m benchmarks jax [--k 8] [--micro 8] [--steps 30] [--memory-k 1,2,4,8,16]
    python -m benchmarks jax --quick          # a tiny model, K=2, XLA unoptimized: a smoke test

A byte-level causal transformer in plain JAX (2 layers, width 128, 128-byte rows; AdamW after
clipping at 1.0), on rows of random bytes with random padding (``benchmarks/jax_model.py``).

* **Speed**: time per optimizer step of K micro-batches of ``--micro`` rows, the contenders taking
  turns in rotating rounds (:func:`benchmarks._harness.interleave`), each call blocking until its
  results are ready; ``--warmup`` rounds (compilation included) discarded; medians and the
  median of per-round ratios to ``hand`` (the hand-written ``lax.scan``: each micro-batch's mean
  loss, gradients summed and divided by K). ``hand2`` is ``hand`` again (A/A: the noise).
  ``bigbatch``: ``make_step`` on a ``Cycle`` (validity mask), ``bigbatch-stacked`` on the plain
  stack; ``bigbatch-multi`` and ``multisteps``: ``bigbatch.jax.multi_steps`` and
  ``optax.MultiSteps``, one jitted call per micro-batch; ``full``: the K·micro rows at once.
* **Memory**: each step compiled for shapes only, ``.lower(...).compile().memory_analysis()``, at
  one global batch (the largest ``--memory-k`` × 8 rows) cut into K micro-batches; the full batch
  in one pass is the reference. Then ``largest_micro_batch`` for a budget of ``--budget`` × the
  full batch's peak.
* **Distance**: 4 AdamW steps in float64 from the same start on the same padded cycles (K=4):
  ‖θ − θ_full‖ / ‖θ_full − θ_0‖ for each way of accumulating.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._harness import (
    BenchmarkError,
    choices,
    fill,
    int_list,
    interleave,
    log,
    parse,
    parser,
    results_path,
    summarize,
    write_results,
)

FULL = {"steps": 30, "k": 8, "micro": 8, "warmup": 3, "memory_k": "1,2,4,8,16"}
QUICK = {"steps": 2, "k": 2, "micro": 2, "warmup": 1, "memory_k": "1,2"}
PARTS = ("speed", "memory", "distance")
NAMES = {"hand": "hand-written lax.scan (mean / K)", "hand2": "hand-written again (A/A)",
         "bigbatch": "bigbatch make_step (Cycle, mask)",
         "bigbatch-stacked": "bigbatch make_step (plain stack)",
         "bigbatch-multi": "bigbatch multi_steps (K calls)",
         "multisteps": "optax.MultiSteps (K calls)",
         "full": "full batch (one pass)"}
MIB = 2 ** 20


def speed(args: Any, jax: Any, bj: Any, jm: Any, optax: Any) -> dict[str, Any]:
    shape, k, micro = args.shape, args.k, args.micro
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    p0 = jm.init_params(shape)
    cycles = [jax.device_put(c) for c in jm.make_cycles(shape, k, micro, args.warmup + args.steps)]
    loss = lambda p, b: jm.nll_sum_count(p, b, shape.n_head)  # noqa: E731
    multi, exact_multi = optax.MultiSteps(opt, k), bj.multi_steps(opt, k)
    steps = {"hand": jm.hand_scan_step(opt, shape.n_head),
             "hand2": jm.hand_scan_step(opt, shape.n_head),
             "bigbatch": bj.make_step(loss, opt, donate=True),
             "bigbatch-stacked": bj.make_step(loss, opt, donate=True)}
    micro_multi = jm.multisteps_micro_step(multi, shape.n_head)
    full = jm.full_step(opt, shape.n_head)

    @jax.jit
    def exact_micro(params: Any, state: Any, batch: Any) -> tuple[Any, Any, Any]:
        total, count = loss(params, batch)
        grads = jax.grad(lambda p: loss(p, batch)[0])(params)
        updates, state = exact_multi.update(grads, state, params, count=count)
        return optax.apply_updates(params, updates), state, total / count

    copy = lambda tree: jax.tree_util.tree_map(lambda x: x.copy(), tree)  # noqa: E731
    held = {name: (copy(p0), (multi if name == "multisteps" else exact_multi if
                              name == "bigbatch-multi" else opt).init(p0)) for name in NAMES}
    valid = jax.numpy.ones(k, bool)
    micro_batches = [[jax.tree_util.tree_map(lambda x, i=i: x[i], c) for i in range(k)]
                     for c in cycles]
    flat = [jm.flatten(c) for c in cycles]

    def runner(name: str) -> Any:
        def run(r: int) -> None:
            params, state = held[name]
            if name in ("bigbatch-multi", "multisteps"):
                fn = exact_micro if name == "bigbatch-multi" else micro_multi
                for mb in micro_batches[r]:
                    params, state, out = fn(params, state, mb)
            elif name == "full":
                params, state, out = full(params, state, flat[r])
            else:
                data = bj.Cycle(cycles[r], valid) if name == "bigbatch" else cycles[r]
                params, state, out = steps[name](params, state, data)
            jax.block_until_ready((params, state, out))
            held[name] = (params, state)
        return run

    # Turn order: the scan-shaped steps follow one another, each after one of its kind (the
    # full batch frees hundreds of MiB of temporaries, which the next step pays for).
    order = ("full", "multisteps", "bigbatch-multi", "hand", "hand2", "bigbatch",
             "bigbatch-stacked")
    times = interleave({name: runner(name) for name in order}, len(cycles), label="jax speed")
    return summarize(times, args.warmup, "hand")


def memory(args: Any, jax: Any, bj: Any, jm: Any, optax: Any) -> dict[str, Any]:
    shape, ks = args.shape, args.memory_k
    global_batch = max(ks) * (8 if not args.quick else 2)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    params = jax.eval_shape(lambda: jm.init_params(shape))
    state = jax.eval_shape(opt.init, params)
    loss = lambda p, b: jm.nll_sum_count(p, b, shape.n_head)  # noqa: E731
    step = bj.make_step(loss, opt, donate=True)
    hand = jm.hand_scan_step(opt, shape.n_head)
    i32 = jax.numpy.int32

    def batch(*lead: int) -> dict[str, Any]:
        return {key: jax.ShapeDtypeStruct((*lead, shape.seq_len), i32) for key in ("ids", "labels")}

    def cycle_for(micro: int) -> Any:
        k = global_batch // micro
        return bj.Cycle(batch(k, micro), jax.ShapeDtypeStruct((k,), jax.numpy.bool_))

    full = bj.step_memory(jm.full_step(opt, shape.n_head), params, state, batch(global_batch))
    rows = [{"k": 0, "micro": global_batch, "method": "full", **full._asdict()}]
    for k in ks:
        micro = global_batch // k
        rows.append({"k": k, "micro": micro, "method": "bigbatch",
                     **bj.step_memory(step, params, state, cycle_for(micro))._asdict()})
        rows.append({"k": k, "micro": micro, "method": "hand",
                     **bj.step_memory(hand, params, state, batch(k, micro))._asdict()})
    budget = int(args.budget * full.peak)
    try:
        fit = bj.largest_micro_batch(step, params, state, cycle_for, budget,
                                     [global_batch // k for k in ks])
        found = {"micro": fit.micro, "peak": fit.memory.peak,
                 "tried": {str(m): mem.peak for m, mem in fit.tried.items()}}
    except bj.BudgetError as err:
        found = {"micro": None, "error": str(err)}
    return {"global_batch": global_batch, "rows": rows, "budget_bytes": budget, "fit": found}


def distance(args: Any, jax: Any, bj: Any, jm: Any, optax: Any) -> dict[str, float]:
    with jax.enable_x64(True):
        shape, k, jnp = args.shape, 4, jax.numpy
        opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3))
        p0 = jm.init_params(shape, dtype=jnp.float64)
        cycles = [jax.device_put(c) for c in jm.make_cycles(shape, k, 4, 4, seed=2)]
        loss = lambda p, b: jm.nll_sum_count(p, b, shape.n_head)  # noqa: E731

        def micro_step(tx: Any, exact: bool) -> Any:
            @jax.jit
            def step(params: Any, state: Any, mb: Any) -> tuple[Any, Any]:
                if exact:
                    grads, count = jax.grad(loss, has_aux=True)(params, mb)
                    updates, state = tx.update(grads, state, params, count=count)
                else:
                    grads = jax.grad(jm.token_mean)(params, mb, shape.n_head)
                    updates, state = tx.update(grads, state, params)
                return optax.apply_updates(params, updates), state
            return step

        def train(name: str) -> Any:
            if name in ("full", "bigbatch", "hand"):
                step = {"full": jm.full_step(opt, shape.n_head), "hand": jm.hand_scan_step(
                    opt, shape.n_head), "bigbatch": bj.make_step(loss, opt, donate=True)}[name]
                params, state = jax.tree_util.tree_map(jnp.copy, p0), opt.init(p0)
                for c in cycles:
                    params, state, _ = step(params, state, jm.flatten(c) if name == "full" else c)
                return params
            exact = name == "bigbatch-multi"
            tx = bj.multi_steps(opt, k) if exact else optax.MultiSteps(opt, k)
            step, params, state = micro_step(tx, exact), p0, tx.init(p0)
            for c in cycles:
                for i in range(k):
                    params, state = step(params, state, jax.tree_util.tree_map(
                        lambda x, i=i: x[i], c))
            return params

        def flat(tree: Any) -> Any:
            return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])

        full = flat(train("full"))
        trained = jnp.linalg.norm(full - flat(p0))
        return {name: float(jnp.linalg.norm(flat(train(name)) - full) / trained)
                for name in ("bigbatch", "bigbatch-multi", "hand", "multisteps")}


def tables(report: dict[str, Any]) -> str:
    lines = []
    if "speed" in report:
        sp, st = report["speed"], report["settings"]
        lines += [f"Speed: K={st['k']} micro-batches of {st['micro']} × {st['seq_len']} tokens, "
                  f"median of {st['steps']} interleaved rounds after {st['warmup']}", "",
                  "| method | ms/step | × hand (ratio of medians) | × hand (median of per-round "
                  "ratios) |", "|---|---|---|---|"]
        lines += [f"| {NAMES[n]} | {1e3 * sp['seconds'][n]:.2f} | {sp['ratio'][n]:.3f} | "
                  f"{sp['paired_ratio'][n]:.3f} |" for n in NAMES]
    if "memory" in report:
        mem = report["memory"]
        full = next(r for r in mem["rows"] if r["method"] == "full")
        lines += ["", f"Memory (the compiled step's analysis), global batch "
                  f"{mem['global_batch']} rows:", "",
                  "| K × micro | method | arguments MiB | temporaries MiB | peak MiB | × full |",
                  "|---|---|---|---|---|---|"]
        for r in mem["rows"]:
            lines.append(f"| {'full' if r['method'] == 'full' else r['k']} × {r['micro']} | "
                         f"{r['method']} | {r['argument'] / MIB:.2f} | {r['temp'] / MIB:.2f} | "
                         f"{r['peak'] / MIB:.2f} | {r['peak'] / full['peak']:.3f} |")
        fit = mem["fit"]
        found = (f"micro-batch {fit['micro']} (peak {fit['peak'] / MIB:.2f} MiB)"
                 if fit["micro"] else fit["error"])
        lines += ["", f"largest_micro_batch with a budget of {mem['budget_bytes'] / MIB:.2f} MiB: "
                  f"{found}"]
    if "distance" in report:
        lines += ["", "Distance to the full batch after 4 AdamW steps, float64, K=4 "
                  "(‖θ − θ_full‖ / ‖θ_full − θ_0‖):", "", "| method | distance |", "|---|---|"]
        lines += [f"| {NAMES[n]} | {d:.1e} |" for n, d in report["distance"].items()]
    return "\n".join(lines)


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = report["memory"]
    full = next(r for r in mem["rows"] if r["method"] == "full")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, style in (("bigbatch", "o-"), ("hand", "s--")):
        rows = [r for r in mem["rows"] if r["method"] == method]
        ax.plot([r["k"] for r in rows], [r["peak"] / MIB for r in rows], style,
                label=f"{NAMES[method]}: peak")
    ax.axhline(full["peak"] / MIB, color="gray", linestyle=":", label="full batch: peak")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"K (micro-batches of a global batch of {mem['global_batch']} rows)")
    ax.set_ylabel("MiB (compiled step's memory analysis)")
    ax.set_title("JAX: memory of the compiled step vs K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("jax", __doc__)
    p.add_argument("--steps", type=int, help=f"timed rounds (default {FULL['steps']})")
    p.add_argument("--k", type=int, help=f"micro-batches per step (default {FULL['k']})")
    p.add_argument("--micro", type=int, help=f"rows per micro-batch (default {FULL['micro']})")
    p.add_argument("--warmup", type=int, help=f"rounds discarded first (default {FULL['warmup']})")
    p.add_argument("--memory-k", help=f"K values of the memory table (default {FULL['memory_k']})")
    p.add_argument("--budget", type=float, default=0.6,
                   help="largest_micro_batch's budget, × the full batch's peak (default 0.6)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)} (default all)")
    p.add_argument("--png", help="where to draw the memory plot (default: next to the JSON)")
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    if min(args.steps, args.k, args.micro) < 1 or args.warmup < 0 or args.budget <= 0:
        p.error("--steps, --k and --micro must be at least 1, --warmup at least 0, --budget > 0")
    args.memory_k = int_list(p, "--memory-k", args.memory_k)
    parts = choices(p, "--parts", args.parts, PARTS)
    if args.quick:  # a smoke run: compile fast (XLA reads this when JAX first starts a backend)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_backend_optimization_level=0")
    try:
        import jax
        import optax

        import bigbatch.jax as bj
    except ImportError as err:
        raise BenchmarkError(f"needs JAX and optax ({err}); pip install -e '.[jax]'") from None
    from . import jax_model as jm

    args.shape = jm.QUICK_SHAPE if args.quick else jm.FULL_SHAPE
    report: dict[str, Any] = {"settings": {
        "k": args.k, "micro": args.micro, "steps": args.steps, "warmup": args.warmup,
        "seq_len": args.shape.seq_len, "memory_k": args.memory_k, "budget": args.budget,
        "model": {"n_layer": args.shape.n_layer, "d_model": args.shape.d_model,
                  "n_head": args.shape.n_head}, "parts": parts,
        "devices": [str(d) for d in jax.devices()]},
        "versions": {"jax": jax.__version__, "optax": optax.__version__}}
    for part, fn in (("speed", speed), ("memory", memory), ("distance", distance)):
        if part in parts:
            log(f"jax: {part}")
            report[part] = fn(args, jax, bj, jm, optax)
    report["markdown"] = tables(report)
    print(report["markdown"])
    if "memory" in report:
        png = Path(args.png) if args.png else results_path(args, ".png")
        plot(report, png)
        log(f"wrote {png}")
    write_results(args, report)
    return 0
