"""Exact accumulation for losses over the whole batch's embeddings (gradient caching).

An in-batch-negatives loss is not a sum over micro-batches: each anchor's term depends on every
embedding of the effective batch, so K micro-batches of 16 see 15 negatives each, not 255.
:func:`contrastive_step` computes the full-batch loss and its exact gradient with the memory of one
micro-batch (the two-pass scheme of Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup"):

1. embed every micro-batch without a graph (RNG state saved per micro-batch);
2. concatenate the embeddings (under ``torch.distributed``: all-gathered from every rank), make
   them leaves, and backpropagate the full loss ``L`` to them once: ``G = ∂L/∂E``;
3. re-embed each micro-batch with a graph (same RNG state, so the same dropout masks) and
   backpropagate its slice of ``G``. By the chain rule
   ``∂L/∂θ = Σ_k (∂E_k/∂θ)ᵀ G_k``: the full-batch gradient.

Step 3 goes through :meth:`Accumulator.accumulate` with the surrogate ``Σ E_k ⊙ G_k`` (whose
gradient is that term), so normalization by the item count, clipping, precision, the scheduler,
non-finite skipping and the DDP/FSDP2 sync all apply once per step as for any loss. The encoder
must not hold batch statistics (BatchNorm would see each micro-batch twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed
from .engine import Accumulator, StepStats
from .errors import LossError
from .loss import LossSum

__all__ = ["contrastive_step", "info_nce"]

EncodeFn = Callable[[torch.nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, ...]"]
BatchLossFn = Callable[..., LossSum]


def info_nce(queries: torch.Tensor, docs: torch.Tensor, *, temperature: float = 0.05,
             symmetric: bool = False, normalize: bool = True) -> LossSum:
    """InfoNCE / multiple-negatives ranking loss with in-batch negatives, as a sum and a count.

    Row i of ``queries`` matches row i of ``docs``; every other doc is a negative. With
    ``s_ij = cos(q_i, d_j) / τ`` (dot products when ``normalize=False``):

        L = Σ_i −log softmax_j(s_ij)[i]    (+ Σ_j −log softmax_i(s_ij)[j] when symmetric)

    Returns:
        ``LossSum(L, n)`` (``2n`` when symmetric): its mean is the usual loss.

    Raises:
        LossError: shapes differ, or ``temperature`` is not positive.
    """
    if queries.shape != docs.shape or queries.dim() != 2:
        raise LossError(f"info_nce needs two (n, dim) tensors of the same shape, got "
                        f"{tuple(queries.shape)} and {tuple(docs.shape)}")
    if not temperature > 0:
        raise LossError(f"temperature must be positive, got {temperature}")
    if normalize:
        queries, docs = F.normalize(queries, dim=-1), F.normalize(docs, dim=-1)
    logits = queries @ docs.T / temperature
    labels = torch.arange(len(queries), device=queries.device)
    total = F.cross_entropy(logits, labels, reduction="sum")
    if symmetric:
        total = total + F.cross_entropy(logits.T, labels, reduction="sum")
    return LossSum(total, len(queries) * (2 if symmetric else 1))


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    out = out if isinstance(out, tuple) else (out,)
    if not out or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in out):
        raise LossError("encode(model, batch) must return a tensor or a tuple of tensors with a "
                        "batch dimension (e.g. query and document embeddings)")
    return out


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 embeddings in float32 (the loss and its cached gradient need the range)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[torch.Tensor, torch.Tensor | None],
                    device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def _gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, rank order (sizes may differ); returns them and where ours start."""
    world, rank = distributed.world_size(), distributed.rank()
    if world == 1:
        return local, 0
    size = torch.tensor([local.shape[0]], device=local.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    rows = [int(s) for s in sizes]
    padded = local.new_zeros((max(rows), *local.shape[1:]))
    padded[: rows[rank]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, rows)]), sum(rows[:rank])


def contrastive_step(acc: Accumulator, micro_batches: Sequence[Any], encode: EncodeFn,
                     loss: BatchLossFn) -> StepStats:
    """One optimizer step of ``loss`` over the embeddings of all ``micro_batches`` (and ranks).

    Args:
        acc: the engine (its model, optimizer, precision, sync and clipping are used).
        micro_batches: this rank's micro-batches of the step.
        encode: ``encode(model, batch)`` → embeddings, a tensor or a tuple (e.g. ``(q, d)``), each
            with one row per item of ``batch``; must not change with a second call on the same
            RNG state.
        loss: ``loss(*embeddings)`` over the concatenated embeddings of the whole effective
            batch → :class:`LossSum` (e.g. ``lambda q, d: info_nce(q, d, symmetric=True)``).

    Returns:
        The :class:`StepStats`; ``loss`` is the full-batch loss's mean.

    Raises:
        LossError: ``encode`` or ``loss`` return something unusable.
    """
    micro_batches = list(micro_batches)
    device = acc.device
    states, parts = [], []
    with torch.no_grad(), acc.precision.autocast():  # pass 1: embeddings only, no graph
        for batch in micro_batches:
            states.append(_rng_states(device))
            parts.append(_as_tuple(encode(acc.model, batch)))
    after = _rng_states(device)  # where the RNG would be after plain forwards
    slots = len(parts[0]) if parts else 0
    leaves, starts = [], []
    for j in range(slots):
        local = _wide(torch.cat([p[j] for p in parts])) if parts else torch.zeros(0)
        full, start = _gather_rows(local.detach())
        leaves.append(full.requires_grad_(True))
        starts.append(start)
    total = loss(*leaves)
    if not isinstance(total, LossSum) or not total.sum.requires_grad:
        raise LossError("loss(*embeddings) must return a LossSum whose sum depends on them")
    total.sum.backward()  # G = ∂L/∂E for every row of every rank
    cached = [leaf.grad for leaf in leaves]
    offsets = [0] * slots
    rank0 = distributed.rank() == 0
    first = True

    def surrogate(model: torch.nn.Module, k: int) -> LossSum:
        nonlocal first
        _set_rng_states(states[k], device)
        embs = _as_tuple(encode(model, micro_batches[k]))
        s = torch.zeros((), dtype=torch.float64, device=device)
        for j, e in enumerate(embs):
            lo = starts[j] + offsets[j]
            g = cached[j][lo: lo + e.shape[0]]  # type: ignore[index]
            offsets[j] += e.shape[0]
            s = s + (_wide(e) * g.to(e.device)).sum().double()
        # gradient: this micro-batch's term of ∂L/∂θ; value: the loss, counted once (rank 0)
        value = total.sum.detach().double() if (first and rank0) else s.new_zeros(())
        count = total.count if (first and rank0) else 0
        first = False
        return LossSum(s - s.detach() + value, count)

    try:
        return acc.step(list(range(len(micro_batches))), surrogate)
    finally:
        _set_rng_states(after, device)
