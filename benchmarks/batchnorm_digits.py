"""BatchNorm under gradient accumulation: five ways to train one small CNN, several seeds.

The scikit-learn digits images (1,797 8×8 greyscale digits, shipped with scikit-learn: nothing is
downloaded), a fixed stratified split of 1,437 training and 360 test images, and a CNN of two
conv + BatchNorm2d + ReLU blocks. Each setting trains the same initialization on the same global
batches for the same number of optimizer steps; the table gives the test accuracy (eval mode) over
the seeds:

    full     BatchNorm, the global batch in one pass (K = 1): the reference
    accum    BatchNorm under accumulation: micro-batch statistics, K running-statistic updates
    group    converted to GroupNorm (bigbatch.convert_batchnorm(model, to="group"))
    freeze   frozen BatchNorm (to="freeze"); from scratch its statistics are the initial 0 and 1,
             so it does not normalize at all (freezing is meant for fine-tuning)
    pooled   BatchNorm with pooled running statistics (Accumulator(..., batchnorm="pooled"))

    pip install -e ".[examples]"
    python -m benchmarks batchnorm_digits            # 5 seeds × 5 settings, the README's table
    python -m benchmarks batchnorm_digits --quick    # 2 seeds, 2 steps of 32 = 4 × 8: a smoke test

Not timed against each other (the seconds per run are wall time of each training run, one after
the other); the numbers are test accuracies.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bigbatch

from ._harness import BenchmarkError, fill, log, parse, parser, write_results

SETTINGS = {
    "full": "(a) BatchNorm, full batch",
    "accum": "(b) BatchNorm, accumulation",
    "group": "(c) GroupNorm (converted), accumulation",
    "freeze": "(d) BatchNorm frozen, accumulation",
    "pooled": "(e) BatchNorm pooled, accumulation",
}


@dataclass(frozen=True)
class Result:
    """One setting over the seeds."""

    setting: str
    k: int
    accuracies: tuple[float, ...]
    seconds: float  # mean wall time of one training run

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test images ``(N, 1, 8, 8)`` scaled to [0, 1] and their labels (a fixed split)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise BenchmarkError("the digits images come with scikit-learn: "
                             "pip install -e '.[examples]'") from None

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.get_default_dtype()).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    i_train, i_test = train_test_split(range(len(y)), test_size=360, stratify=digits.target,
                                       random_state=0)
    return x[i_train], y[i_train], x[i_test], y[i_test]


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> bigbatch.LossSum:
    x, y = batch
    return bigbatch.LossSum(F.cross_entropy(model(x), y, reduction="sum"), y.numel())


def global_batches(n: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of successive global batches: a fresh permutation of the data per epoch."""
    g = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(n, generator=g)])
        yield pending[:size]
        pending = pending[size:]


def train_one(setting: str, seed: int, data, *, steps: int, global_batch: int,
              micro_batch: int, lr: float) -> float:
    """Test accuracy after ``steps`` optimizer steps of one setting."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_cnn()
    if setting in ("group", "freeze"):
        model = bigbatch.convert_batchnorm(model, to=setting)  # type: ignore[arg-type]
    micro = global_batch if setting == "full" else micro_batch
    plan = bigbatch.BatchPlan(global_batch=global_batch, micro_batch=micro, world_size=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    acc = bigbatch.Accumulator(model, opt, batchnorm="pooled" if setting == "pooled" else "ignore")
    batches = global_batches(len(y_train), global_batch, seed)
    model.train()
    for _ in range(steps):
        rows = next(batches)
        stats = acc.step(plan.split((x_train[rows], y_train[rows])), loss_fn)
        assert not stats.skipped, stats.skip_reason
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def run(seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int = 100, global_batch: int = 256,
        micro_batch: int = 8, lr: float = 3e-3, settings: Sequence[str] = tuple(SETTINGS),
        log: Callable[[str], None] | None = None) -> list[Result]:
    """Train every setting on every seed; one :class:`Result` per setting, in order."""
    data = load_data()
    results = []
    for setting in settings:
        accs, seconds = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            accs.append(train_one(setting, seed, data, steps=steps, global_batch=global_batch,
                                  micro_batch=micro_batch, lr=lr))
            seconds.append(time.perf_counter() - t0)
            if log:
                log(f"{setting:>7} seed {seed}: test accuracy {accs[-1]:.4f} "
                    f"({seconds[-1]:.1f}s)")
        k = 1 if setting == "full" else global_batch // micro_batch
        results.append(Result(setting, k, tuple(accs), statistics.fmean(seconds)))
    return results


def format_table(results: Sequence[Result], *, steps: int, global_batch: int,
                 micro_batch: int) -> str:
    seeds = len(results[0].accuracies)
    lines = [
        f"| setting | micro-batch × K | test accuracy, mean ± std ({seeds} seeds) | min – max "
        "| seconds per run |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        micro = global_batch // r.k
        lines.append(f"| {SETTINGS[r.setting]} | {micro} × {r.k} | "
                     f"{100 * r.accuracy:.2f}% ± {100 * r.spread:.2f} | "
                     f"{100 * min(r.accuracies):.2f} – {100 * max(r.accuracies):.2f} | "
                     f"{r.seconds:.1f} |")
    threads = torch.get_num_threads()
    lines.append(f"\n{steps} optimizer steps of global batch {global_batch} (AdamW), "
                 f"torch {torch.__version__}, {threads} thread{'s' if threads > 1 else ''}.")
    return "\n".join(lines)


FULL = {"seeds": 5, "steps": 100, "global_batch": 256, "micro_batch": 8}
QUICK = {"seeds": 2, "steps": 2, "global_batch": 32, "micro_batch": 8}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("batchnorm_digits", __doc__)
    p.add_argument("--seeds", type=int, help=f"seeds 0..N-1 (default {FULL['seeds']})")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL['steps']})")
    p.add_argument("--global-batch", type=int, help=f"default {FULL['global_batch']}")
    p.add_argument("--micro-batch", type=int, help=f"default {FULL['micro_batch']}")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: faster than 2 for these tiny tensors)")
    args = parse(p, argv)
    fill(args, FULL, QUICK)
    if min(args.seeds, args.steps, args.global_batch, args.micro_batch, args.threads) < 1:
        p.error("--seeds, --steps, --global-batch, --micro-batch and --threads must be >= 1")
    if args.global_batch % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide --global-batch "
                f"{args.global_batch}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = run(range(args.seeds), args.steps, args.global_batch, args.micro_batch, args.lr,
                  log=log)
    print(format_table(results, steps=args.steps, global_batch=args.global_batch,
                       micro_batch=args.micro_batch))
    total = time.perf_counter() - t0
    print(f"Total {total:.0f}s.")
    write_results(args, {
        "settings": {"seeds": args.seeds, "steps": args.steps, "global_batch": args.global_batch,
                     "micro_batch": args.micro_batch, "lr": args.lr, "threads": args.threads,
                     "optimizer": "AdamW(lr, weight_decay=0)"},
        "rows": [{"setting": r.setting, "label": SETTINGS[r.setting], "k": r.k,
                  "micro_batch": args.global_batch // r.k, "accuracies": list(r.accuracies),
                  "accuracy": r.accuracy, "spread": r.spread, "seconds_per_run": r.seconds}
                 for r in results],
        "seconds_total": total})
    return 0
