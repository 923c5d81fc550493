"""The fastest partition of a global batch: contiguous runs of the length order, by a cost model.

Any grouping of a step's samples gives the same exact update (see :mod:`bigbatch.packing`), so
the grouping is free to follow speed alone. Sorted by length (longest first), a group is a run
``[i, j)`` of that order padded to its first sample's length ``T = max(L_i, 1)``; with ``r = j - i``
rows its predicted time is

    t(r, T) = a + b · r·T + c · r·T²

— ``a`` the fixed cost of one forward and backward (kernel launches, optimizer-free work per
micro-batch), ``b`` the per-token-position cost (embeddings, MLPs, projections, the loss) and
``c`` the attention term, quadratic in the row length. :func:`partition_by_cost` finds, by dynamic
programming over the sorted order, the runs that minimise ``Σ t`` subject to a memory budget
``r · T <= max_tokens``:

    best[0] = 0,  best[j] = min_{i < j, (j - i)·T_i <= max_tokens} best[i] + t(j - i, T_i)

in ``O(n · R)`` for ``n`` samples and at most ``R`` rows per group. Every contiguous partition of
the sorted order is a candidate — among them "sort, then cut into equal row counts" and the
greedy token-budget packing of :func:`bigbatch.pack_by_tokens` — so under the cost model the
result is never slower than either. Restricting to runs of the sorted order loses nothing:
swapping a sample ``x`` of a group whose longest is ``T_A`` with a longer sample ``y <= T_A`` of a
group whose longest is ``T_B <= T_A`` keeps ``T_A`` and never widens the other group, so some
optimal partition has every group a run of the sorted order.

The coefficients come from :func:`measure_cost`, a short probe of the actual model (a few
forward/backward passes at chosen shapes, fitted by non-negative least squares), so that a
partition reflects this model on this machine; store them with the run to re-partition
identically on resume (the result depends on the lengths, the budget and ``a, b, c`` alone).
Only their ratios matter. Without a measurement, :data:`PRIOR` stands in: ``a`` = 128 token
positions and ``c`` = 1/1000 of a position per column, rounded from the ratios measured for the
built-in GPT (4 layers, width 128) on a 2-core CPU (``benchmarks/packing.py`` prints its fit:
``a/b`` about 80, ``c/b`` 1e-3 to 1.6e-3). On a GPU, where a micro-batch's fixed cost weighs far
more, measure.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .memory import time_micro_batch
from .packing import PackingError, _as_lengths, _check_budget

__all__ = ["PRIOR", "CostModel", "equal_row_partition", "measure_cost", "partition_by_cost"]


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds of one micro-batch of ``rows`` × ``width``: ``a + b·rows·width +
    c·rows·width²``.

    Attributes:
        per_micro: ``a``, seconds per micro-batch whatever its size (>= 0).
        per_token: ``b``, seconds per padded token position (>= 0).
        per_token_sq: ``c``, seconds per row per squared column count, attention's term (>= 0).
    """

    per_micro: float
    per_token: float
    per_token_sq: float = 0.0

    def __post_init__(self) -> None:
        for name in ("per_micro", "per_token", "per_token_sq"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise PackingError(f"CostModel.{name} is {value!r}; give a finite number >= 0 "
                                   "(seconds), e.g. from measure_cost")
        if self.per_micro == self.per_token == self.per_token_sq == 0:
            raise PackingError("CostModel is all zeros: every partition would cost nothing; give "
                               "measured coefficients (measure_cost) or e.g. CostModel(1e-3, 1e-6)")

    def time(self, rows: int, width: int) -> float:
        """Predicted seconds of a forward and backward on ``rows`` × ``width`` positions."""
        return self.per_micro + rows * width * (self.per_token + self.per_token_sq * width)

    def as_list(self) -> list[float]:
        """``[a, b, c]``, as a run's config stores it."""
        return [float(self.per_micro), float(self.per_token), float(self.per_token_sq)]

    def describe(self) -> str:
        """One line with the coefficients, in readable units."""
        return (f"{self.per_micro * 1e3:.3g} ms per micro-batch + {self.per_token * 1e6:.3g} µs "
                f"per token position + {self.per_token_sq * 1e9:.3g} ns per row × column²")


#: The cost model used when none is given, in units of one token position (see the module).
PRIOR = CostModel(per_micro=128.0, per_token=1.0, per_token_sq=1e-3)


def _sorted(values: list[int]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties in batch order


def partition_by_cost(lengths: torch.Tensor | Sequence[int], max_tokens: int,
                      cost: CostModel | None = None) -> list[torch.Tensor]:
    """The partition into runs of the length order that minimises the predicted step time.

    See the module docstring for the recurrence. Ties between partitions of equal predicted time
    go to the one with fewer groups, then to the earlier cut, so the result depends on
    ``lengths``, ``max_tokens`` and ``cost`` alone.

    Args:
        lengths: each sample's real length (columns it needs), >= 0.
        max_tokens: padded token positions per micro-batch at most (rows × columns): the
            memory budget, as in :func:`bigbatch.pack_by_tokens`.
        cost: the cost model, e.g. from :func:`measure_cost`; None: :data:`PRIOR`.

    Returns:
        One ``LongTensor`` of positions into ``lengths`` per micro-batch, longest samples first
        (within a group too); every position in exactly one group. Empty when ``lengths`` is.

    Raises:
        PackingError: as in :func:`bigbatch.pack_by_tokens` (bad budget or lengths, or a sample
            longer than ``max_tokens``).
    """
    budget = _check_budget(max_tokens)
    cost = PRIOR if cost is None else cost
    if not isinstance(cost, CostModel):
        raise PackingError(f"cost must be a CostModel, got {type(cost).__name__}; build one with "
                           "measure_cost(...) or CostModel(a, b, c)")
    values = _as_lengths(lengths)
    if not values:
        return []
    order = _sorted(values)
    width = [max(values[i], 1) for i in order]
    if width[0] > budget:
        raise PackingError(
            f"sample {order[0]} has {width[0]} tokens, more than max_tokens {budget} (one "
            f"micro-batch must hold a whole sample); give max_tokens >= {width[0]} or cut samples "
            "shorter")
    n = len(order)
    best = [0.0] + [math.inf] * n
    groups = [0] + [0] * n  # groups on the best path, for ties
    cut = [0] * (n + 1)
    for i in range(n):  # forward: extend the best partition of the first i samples
        if best[i] == math.inf:
            continue
        t = width[i]
        for j in range(i + 1, min(n, i + budget // t) + 1):
            value = best[i] + cost.time(j - i, t)
            if value < best[j] or (value == best[j] and groups[i] + 1 < groups[j]):
                best[j], groups[j], cut[j] = value, groups[i] + 1, i
    bounds = []
    j = n
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    return [torch.tensor(order[i:j], dtype=torch.int64) for i, j in reversed(bounds)]


def equal_row_partition(lengths: torch.Tensor | Sequence[int], groups: int) -> list[torch.Tensor]:
    """Sort by length (longest first) and cut into ``groups`` runs of equal row counts (the first
    ``n mod groups`` one row longer): the simple baseline :func:`partition_by_cost` must beat.

    Raises:
        PackingError: ``groups`` is not a positive integer, or bad ``lengths``.
    """
    values = _as_lengths(lengths)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise PackingError(f"groups {groups!r} is not a positive integer; give the number of "
                           "micro-batches")
    order = _sorted(values)
    size, extra = divmod(len(order), groups)
    out, start = [], 0
    for g in range(min(groups, len(order))):
        stop = start + size + (g < extra)
        out.append(torch.tensor(order[start:stop], dtype=torch.int64))
        start = stop
    return out


def measure_cost(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], Any],
                 make_batch: Callable[[int, int], Any], max_tokens: int, longest: int, *,
                 repeats: int = 3,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                 ) -> CostModel:
    """Fit :class:`CostModel` to forward and backward times of ``model`` at a few shapes.

    The probe shapes are rows × width with widths ``longest, longest/2, longest/4, longest/8``
    (at least 1) and rows ``1`` and ``max_tokens // width`` (at most ``max_tokens`` positions,
    so no more memory than a training micro-batch): up to 8 shapes, each timed ``repeats`` times
    after a warm-up (:func:`bigbatch.memory.time_micro_batch`; gradients are cleared and the
    random state kept). ``a, b, c >= 0`` minimise the squared relative error of the prediction
    over the shapes (the best of the least-squares fits on each subset of the coefficients that
    comes out non-negative).

    Args:
        model, loss_fn: as given to :class:`~bigbatch.Accumulator` (``loss_fn`` returns a
            :class:`~bigbatch.LossSum`).
        make_batch: ``make_batch(rows, width)`` returns a micro-batch of that shape, with real
            tokens (on the model's device).
        max_tokens: the budget of token positions per micro-batch.
        longest: the longest row the data holds (columns).

    Returns:
        The fitted :class:`CostModel`.

    Raises:
        PackingError: ``longest`` is not a positive integer, or ``max_tokens < longest``.
    """
    budget = _check_budget(max_tokens)
    if isinstance(longest, bool) or not isinstance(longest, int) or not 1 <= longest <= budget:
        raise PackingError(f"longest {longest!r} must be an integer in [1, max_tokens={budget}]; "
                           "give the longest sample's length")
    widths = sorted({max(longest // d, 1) for d in (1, 2, 4, 8)}, reverse=True)
    shapes = sorted({(r, w) for w in widths for r in (1, budget // w)})
    rows = []
    for r, w in shapes:
        seconds, _ = time_micro_batch(model, loss_fn, make_batch(r, w), repeats=repeats,
                                      autocast=autocast)
        rows.append((r, w, seconds))
    return _fit(rows)


def _fit(samples: Sequence[tuple[int, int, float]]) -> CostModel:
    """Non-negative least squares on relative errors, by trying each subset of coefficients."""
    features = torch.tensor([[1.0, r * w, r * w * w] for r, w, _ in samples], dtype=torch.float64)
    times = torch.tensor([s for *_, s in samples], dtype=torch.float64)
    weights = 1 / times.clamp_min(1e-12)  # relative error: each shape counts alike
    best: tuple[float, list[float]] | None = None
    for keep in itertools.chain.from_iterable(itertools.combinations(range(3), k)
                                              for k in (1, 2, 3)):
        x = features[:, list(keep)] * weights[:, None]
        solution = torch.linalg.lstsq(x, times * weights).solution
        if (solution < 0).any():
            continue
        coef = [0.0, 0.0, 0.0]
        for k, v in zip(keep, solution.tolist()):
            coef[k] = v
        err = float(((features @ torch.tensor(coef, dtype=torch.float64) - times) * weights)
                    .square().sum())
        if best is None or err < best[0]:
            best = (err, coef)
    assert best is not None  # a single positive coefficient always fits positive times
    return CostModel(*best[1])
