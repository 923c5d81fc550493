"""Independent full-batch references for the exactness tests.

Nothing here uses bigbatch: the truth is plain PyTorch on the concatenated batch with a
mean-reduced loss, one backward, ``torch.nn.utils.clip_grad_norm_``, one optimizer step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

RTOL = 1e-10


class TinyLM(torch.nn.Module):
    """A small pre-LN causal transformer built from torch.nn layers (independent of bigbatch)."""

    def __init__(self, vocab: int = 32, d: int = 16, heads: int = 2, layers: int = 2,
                 seq: int = 12) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.randn(seq, d) * 0.1)
        # No biases (as in most current LLMs): a key bias has an identically zero gradient, and
        # Adam turns the rounding noise of a zero into eps-sized steps that no tolerance can judge.
        layer = torch.nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True,
            bias=False,
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=self.pos.dtype)
        h = self.emb(ids) + self.pos[:t]
        return self.head(self.blocks(h, mask=mask, is_causal=True))


class _Fault(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, limits):  # type: ignore[override]
        ctx.limits = limits
        if x.shape[0] > limits["forward"]:
            limits["raised"] += 1
            raise torch.OutOfMemoryError(f"injected: forward of {x.shape[0]} rows")
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if grad.shape[0] > ctx.limits["backward"]:
            ctx.limits["raised"] += 1
            raise torch.OutOfMemoryError(f"injected: backward of {grad.shape[0]} rows")
        return grad, None


class FaultyLM(torch.nn.Module):
    """TinyLM with a fault point between its blocks and its head: a backward fault strikes after
    the head's gradient has been accumulated and before the blocks' has."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lm = TinyLM()
        self.limits = {"forward": 10**9, "backward": 10**9, "raised": 0}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lm = self.lm
        t = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=lm.pos.dtype)
        h = lm.blocks(lm.emb(ids) + lm.pos[:t], mask=mask, is_causal=True)
        return lm.head(_Fault.apply(h, self.limits))


def mlp(d_in: int = 6, d_out: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 24), torch.nn.Tanh(), torch.nn.Linear(24, d_out)
    )


def lm_batch(n: int, seq: int = 12, vocab: int = 32, lengths: Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random token rows; row i has ``lengths[i]`` real labels, the rest are -100 padding."""
    ids = torch.randint(0, vocab, (n, seq), generator=generator)
    labels = torch.randint(0, vocab, (n, seq), generator=generator)
    if lengths is None:
        lengths = torch.randint(0, seq + 1, (n,), generator=generator).tolist()
    for i, length in enumerate(lengths):
        labels[i, length:] = -100
    return {"input_ids": ids, "labels": labels}


def lm_mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                           ignore_index=-100)


def concat(batches: Sequence[object]) -> object:
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)  # type: ignore[arg-type]
    if isinstance(first, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in first}  # type: ignore[index]
    return type(first)(torch.cat(parts) for parts in zip(*batches))  # type: ignore[call-overload]


def full_batch_train(
    model: torch.nn.Module,
    make_opt: Callable[[torch.nn.Module], torch.optim.Optimizer],
    cycles: Sequence[Sequence[object]],
    mean_loss: Callable[[torch.nn.Module, object], torch.Tensor],
    clip: float | None = None,
) -> torch.nn.Module:
    """Train a copy of ``model``: one full-batch step per cycle on its concatenated batches."""
    model = copy.deepcopy(model)
    opt = make_opt(model)
    for cycle in cycles:
        opt.zero_grad(set_to_none=True)
        mean_loss(model, concat(cycle)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def max_rel_diff(a: torch.nn.Module | Sequence[torch.Tensor],
                 b: torch.nn.Module | Sequence[torch.Tensor]) -> float:
    """max over tensors of ‖a − b‖∞ / ‖b‖∞ (each tensor relative to its own scale)."""
    ta = list(a.parameters()) if isinstance(a, torch.nn.Module) else list(a)
    tb = list(b.parameters()) if isinstance(b, torch.nn.Module) else list(b)
    assert len(ta) == len(tb)
    worst = 0.0
    for x, y in zip(ta, tb):
        scale = y.detach().abs().max().item()
        diff = (x.detach() - y.detach()).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
