"""Losses as a sum and a count.

A micro-batch's loss is reported as :class:`LossSum` — the loss summed over the items it covers and
the number of those items — never as a mean. The engine backpropagates the sums and divides the
accumulated gradient once by the total count of the cycle, which makes the step the exact mean over
the effective batch:

    ∇L = (Σ_k ∇ sum_k) / (Σ_k count_k)

whatever the padding of each micro-batch and however many micro-batches the cycle holds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import LossError

__all__ = ["IGNORE_INDEX", "LossSum", "check_loss", "token_cross_entropy"]

IGNORE_INDEX = -100
"""The label value that marks padding (and masked prompt tokens): left out of sum and count."""


class LossSum(NamedTuple):
    """A summed loss and the number of items the sum covers.

    Attributes:
        sum: scalar tensor, the loss summed over the items (it must carry gradient).
        count: how many items (tokens, samples, …) the sum covers: an ``int`` or an integer scalar
            tensor (a tensor avoids a device synchronization per micro-batch).
    """

    sum: torch.Tensor
    count: int | torch.Tensor

    @classmethod
    def from_mean(cls, mean: torch.Tensor, count: int | torch.Tensor) -> LossSum:
        """Adapt a mean-reduced loss: ``sum = mean × count``.

        Exact when ``mean`` is the mean over exactly ``count`` items (for example
        ``F.mse_loss(pred, y)`` with ``count = y.numel()``). With an ``int`` count of 0 the mean is
        usually NaN; the micro-batch then contributes nothing (a zero sum without gradient, which
        the engine does not backpropagate). Micro-batches that may be empty are better served by a
        sum-reduced loss such as :func:`token_cross_entropy`: the gradient of an empty mean is NaN.
        """
        if not isinstance(count, torch.Tensor) and count == 0:
            return cls(torch.zeros((), dtype=mean.dtype, device=mean.device), 0)
        return cls(mean * count, count)


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> LossSum:
    """Summed cross-entropy over the labels that are not ``ignore_index``, and their count.

    ``sum = Σ_{i: labels_i ≠ ignore_index} −log softmax(logits_i)[labels_i]``,
    ``count = #{i: labels_i ≠ ignore_index}``.

    Args:
        logits: ``[..., vocab]`` unnormalized scores.
        labels: ``[...]`` integer targets, same leading shape as ``logits``. Shift them yourself
            for next-token prediction (``logits[:, :-1]`` against ``labels[:, 1:]``).
        ignore_index: label value that marks padding and other positions to leave out.

    Returns:
        :class:`LossSum` with a scalar sum and an int64 scalar tensor count (on the labels' device).

    Raises:
        LossError: (a ``ValueError``) ``logits`` is a model's output object rather than its
            logits tensor (pass ``outputs.logits``), ``labels`` is not a tensor, or their shapes
            do not line up.
    """
    if not isinstance(logits, torch.Tensor):
        hint = ("pass outputs.logits" if hasattr(logits, "logits") else
                "pass the model's logits")
        raise LossError(f"token_cross_entropy takes the logits tensor [..., vocab], got "
                        f"{type(logits).__name__}; {hint}")
    if not isinstance(labels, torch.Tensor):
        raise LossError(f"token_cross_entropy takes labels as an integer tensor [...], got "
                        f"{type(labels).__name__}")
    if logits.shape[:-1] != labels.shape:
        raise LossError(
            f"logits shape {tuple(logits.shape)} does not match labels shape "
            f"{tuple(labels.shape)}: expected logits [..., vocab] with labels [...]"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    return LossSum(total, (flat_labels != ignore_index).sum())


def check_loss(out: object) -> LossSum:
    """``out`` if it is a usable :class:`LossSum`, else a :class:`~bigbatch.LossError` saying why.

    Usable: ``sum`` a scalar tensor; ``count`` a non-negative ``int`` or an integer scalar tensor.
    """
    if not isinstance(out, LossSum):
        hint = (
            " (wrap a mean-reduced loss as bigbatch.LossSum.from_mean(loss, n_items))"
            if isinstance(out, torch.Tensor)
            else ""
        )
        raise LossError(
            f"loss_fn must return bigbatch.LossSum(sum, count), got {type(out).__name__}{hint}"
        )
    if not isinstance(out.sum, torch.Tensor) or out.sum.dim() != 0:
        raise LossError(
            "LossSum.sum must be a scalar tensor, got "
            + (f"shape {tuple(out.sum.shape)}" if isinstance(out.sum, torch.Tensor) else
               type(out.sum).__name__)
            + "; sum the per-item losses (reduction='sum')"
        )
    count = out.count
    if isinstance(count, torch.Tensor):
        if count.dim() != 0 or count.is_floating_point() or count.is_complex():
            raise LossError(
                f"LossSum.count must be an int or an integer scalar tensor, got a {count.dtype} "
                f"tensor of shape {tuple(count.shape)}"
            )
    elif isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LossError(f"LossSum.count must be a non-negative int, got {count!r}")
    return out
