"""What a run learns: each task's loss as a sum and a count, its step, and its metrics.

* ``causal-lm``: summed next-token cross-entropy over the trained labels (pre-shifted; prompts,
  user turns and padding carry ``IGNORE_INDEX``); count: the trained tokens.
* ``classify``: summed cross-entropy of each sample's class; count: the samples. Accuracy.
* ``contrastive``: InfoNCE with in-batch negatives over the whole effective batch (every rank's
  pairs), exact through gradient caching (:func:`bigbatch.contrastive_step`); count: the pairs.
  Recall@1 and mean reciprocal rank of each query's document among the evaluated documents.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..contrastive import contrastive_step, info_nce
from ..engine import Accumulator, StepStats
from ..loss import LossSum, token_cross_entropy

__all__ = ["TASKS", "Task", "gpt_lm_loss", "hf_lm_loss"]

TEMPERATURE = 0.05  # contrastive: cosine similarities / τ (the usual sentence-embedding value)


def gpt_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    """The built-in GPT: summed next-token cross-entropy over non-padding (pre-shifted) labels
    (with ``position_ids``: padding-free rows, see :func:`bigbatch.pack_rows`)."""
    if "position_ids" in batch:
        return token_cross_entropy(model(batch["input_ids"], batch["position_ids"]),
                                   batch["labels"])
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def hf_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    """A transformers causal LM: its logits (not its own mean loss), the same sum and count.
    Padding-free rows carry ``position_ids`` and no ``attention_mask``: transformers then keeps
    attention within each sample (its packed-sequence masks)."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   **extra).logits
    return token_cross_entropy(logits, batch["labels"])


def classify_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16)
                            else logits, batch["label"], reduction="sum")
    return LossSum(total, torch.as_tensor(len(batch["label"]), device=logits.device))


def _embed(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    return model(**batch["query"]), model(**batch["document"])


def _info_nce(q: torch.Tensor, d: torch.Tensor) -> LossSum:
    return info_nce(q, d, temperature=TEMPERATURE, symmetric=True)


@dataclass(frozen=True)
class Task:
    """A task: its loss (``None`` when the step is not a sum over micro-batches) and its step."""

    name: str
    whole_cycle: bool  # the step needs every micro-batch at once (contrastive)
    unit: str = "tok"  # what the loss's count counts

    def step(self, acc: Accumulator, micro_batches: list[Any]) -> StepStats:
        """One optimizer step over the cycle, for tasks whose loss spans the cycle."""
        return contrastive_step(acc, micro_batches, _embed, _info_nce)

    @torch.no_grad()
    def metrics(self, model: torch.nn.Module, batches: list[Any], loss_fn: Callable,
                autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        """``val_loss`` (the exact mean over the batches), ``val_items`` and the task's own."""
        if self.name == "contrastive":
            return self._retrieval(model, batches, autocast)
        total = torch.zeros((), dtype=torch.float64)
        count, right = 0, 0
        for batch in batches:
            with autocast():
                ls = loss_fn(model, batch)
                if self.name == "classify":
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                    right += int((logits.argmax(-1) == batch["label"]).sum())
            total += ls.sum.double().cpu()
            count += int(ls.count)
        out = {"val_loss": float(total) / count if count else math.nan, "val_items": count}
        if self.name == "classify":
            out["accuracy"] = right / count if count else math.nan
        return out

    def _retrieval(self, model: torch.nn.Module, batches: list[Any],
                   autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
        qs, ds = [], []
        for batch in batches:
            with autocast():
                q, d = _embed(model, batch)
            qs.append(q.float())
            ds.append(d.float())
        q, d = torch.cat(qs), torch.cat(ds)
        ls = _info_nce(q.double(), d.double())
        scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
        rank = (scores > scores.diagonal()[:, None]).sum(1) + 1  # 1 = the right document first
        return {"val_loss": float(ls.sum) / int(ls.count), "val_items": len(q),
                "recall_at_1": float((rank == 1).double().mean()),
                "mrr": float((1.0 / rank.double()).mean())}


TASKS = {"causal-lm": Task("causal-lm", whole_cycle=False, unit="tok"),
         "classify": Task("classify", whole_cycle=False, unit="samples"),
         "contrastive": Task("contrastive", whole_cycle=True, unit="pairs")}
