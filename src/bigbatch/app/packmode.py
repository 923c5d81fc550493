"""``--pack``: how ``bigbatch train`` cuts a global batch of variable-length samples.

* ``rows``: padding-free rows (:func:`bigbatch.pack_rows`) — several samples per row, positions
  restarting per sample and attention kept within it; for the built-in GPT and Hugging Face
  causal LMs (checked once at the start: a packed row must give each sample its logits alone).
* ``partition``: sorted runs chosen by :func:`bigbatch.partition_by_cost` under a cost model
  measured at the start (:func:`bigbatch.measure_cost`) and recorded as ``--pack-cost``, so a
  resume cuts the same way; for any model.
* ``tokens``: sorted and greedy under the budget (:func:`bigbatch.pack_by_tokens`).
* ``none``: ``--micro-batch`` samples per micro-batch.

``auto`` (the default) packs when ``--micro-tokens`` is given or the data's lengths vary (at
least :data:`VARIABLE` of the positions of full-length samples would be padding), as
``partition``: measured the fastest (``benchmarks/packing.py``, 2-core CPU, the built-in GPT
4×128 on standard-library definitions: 1.08× sorting and cutting into equal row counts at 1,024
positions and global batch 64, 1.04× at 512 and 32; padding-free rows 0.97× at both, within 2% of
the no-padding limit; greedy ``tokens`` 0.92× and 0.97×) and usable with any model. The budget is
``--micro-tokens``, else ``--micro-batch × --seq-len`` positions, so no micro-batch needs more
memory than a fixed one. Every mode gives the update of the whole global batch; only the speed
differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..partition import CostModel, measure_cost
from .config import ConfigError, TrainConfig
from .launch import Ranks
from .workload import Workload

__all__ = ["VARIABLE", "Packing", "choose_packing", "padding_share", "rows_refused"]

VARIABLE = 0.05  # padding share above which ``--pack auto`` packs
_PROBE = 4096  # samples looked at to tell variable-length data


@dataclass(frozen=True)
class Packing:
    """The mode chosen, its token budget per micro-batch and (``partition``) its cost model."""

    mode: str = "none"
    budget: int = 0
    cost: CostModel | None = None

    def describe(self) -> str:
        """How the start-up line names the cut."""
        if self.mode == "rows":
            return f"packed into padding-free rows, at most {self.budget:,} tokens per micro-batch"
        if self.mode == "partition":
            return (f"partitioned by length for speed by a cost model, at most "
                    f"{self.budget:,} tokens per micro-batch")
        return f"packed by length into micro-batches of at most {self.budget:,} tokens"


def padding_share(samples: Any, seq_len: int) -> float:
    """The share of ``len × seq_len`` positions that would be padding, over up to
    :data:`_PROBE` samples spread evenly over the set."""
    n = len(samples)
    if not n or not hasattr(samples, "lengths"):
        return 0.0
    idx = torch.linspace(0, n - 1, min(n, _PROBE)).round().long().unique()
    lengths = samples.lengths(idx)
    return 1.0 - float(lengths.sum()) / (len(idx) * seq_len)


def choose_packing(config: TrainConfig, work: Workload, ranks: Ranks, device: torch.device,
                   ) -> tuple[TrainConfig, Packing, list[str]]:
    """Resolve ``--pack`` for this workload: the config to record (``--pack-cost`` filled in
    when measured), the packing, and lines for the log.

    Raises:
        ConfigError: an explicit mode this model or data cannot take.
    """
    batch = config.batch
    asked = batch.pack
    if asked == "none" or work.task.name != "causal-lm" or batch.accum_schedule or \
            batch.auto_micro_batch:
        return config, Packing(), []
    packable = hasattr(work.train, "lengths")
    if not packable:
        if asked != "auto" or batch.micro_tokens:
            raise ConfigError(f"--{'pack ' + asked if asked != 'auto' else 'micro-tokens'}: "
                              "the model's own data give no sample lengths to pack by; drop it")
        return config, Packing(), []
    share = padding_share(work.train, config.data.seq_len)
    if asked == "auto" and not batch.micro_tokens and share < VARIABLE:
        return config, Packing(), []
    budget = batch.micro_tokens or config.plan(ranks.world_size).micro_batch * config.data.seq_len
    lines = [] if asked != "auto" else [
        f"--pack auto: {share:.0%} of the positions would be padding" if share >= VARIABLE
        else "--pack auto: --micro-tokens given"]
    mode = "partition" if asked == "auto" else asked
    if mode == "rows":
        why = rows_refused(work)
        if why:
            raise ConfigError(f"--pack rows: {why}; use --pack partition")
    cost = None
    if mode == "partition":
        cost = batch.cost_model()
        if cost is None:
            start = time.perf_counter()
            cost = _measure(work, budget, config.data.seq_len, ranks)
            config = config.replace(pack_cost=",".join(f"{v:.6g}" for v in cost.as_list()))
            lines.append(f"cost model (recorded as --pack-cost {config.batch.pack_cost}; probe "
                         f"{time.perf_counter() - start:.1f}s): {cost.describe()}")
    return config, Packing(mode, budget, cost), lines


def rows_refused(work: Workload) -> str:
    """Why padding-free rows cannot be used with this model ('' when they can)."""
    if work.kind == "gpt":
        return ""
    if work.kind != "hf":
        return "a module:function model may not take position_ids"
    return _hf_rows_check(work)


@torch.no_grad()
def _hf_rows_check(work: Workload) -> str:
    """Two samples packed into one row must each get the logits they get alone."""
    model = work.model
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randint(0, _vocab(work), (1, n), generator=g).to(work.device)
                for n in (5, 4))
        row = torch.cat([a, b], 1)
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=work.device)
        try:
            packed = model(input_ids=row, position_ids=positions).logits[0].float()
        except (TypeError, ValueError) as err:
            return f"the model does not take position_ids ({str(err).splitlines()[0][:80]})"
        alone = torch.cat([model(input_ids=a).logits[0], model(input_ids=b).logits[0]]).float()
        scale = float(alone.abs().max()) or 1.0
        if float((packed - alone).abs().max()) > 1e-3 * scale:
            return "the model lets attention cross from one packed sample into the next"
        return ""
    finally:
        model.train(was_training)


def _measure(work: Workload, budget: int, seq_len: int, ranks: Ranks) -> CostModel:
    """Rank 0's cost model (every rank probes its own copy; all use the first one's)."""
    vocab = _vocab(work)

    def make(rows: int, width: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(rows * 100_003 + width)
        ids = torch.randint(0, vocab, (rows, width), generator=g)
        return work.to_device({"input_ids": ids, "labels": ids.clone(),
                               **({"attention_mask": torch.ones_like(ids)}
                                  if work.kind == "hf" else {})})

    cost = measure_cost(work.model, work.loss, make, budget, seq_len, repeats=2)
    return ranks.gather(cost)[0] if ranks.world_size > 1 else cost


def _vocab(work: Workload) -> int:
    embeddings = getattr(work.model, "get_input_embeddings", None)
    if embeddings is not None:
        return int(embeddings().num_embeddings)
    return int(getattr(getattr(work.model, "config", None), "vocab_size", 256))
