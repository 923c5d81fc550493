"""Exact accumulation in a Hugging Face Accelerate loop: :class:`ExactAccumulation`.

The change to the loop the Accelerate docs show (``accumulate()``, ``backward``, clipping on
``sync_gradients``, ``optimizer.step()``, ``scheduler.step()``, ``zero_grad()``)::

    exact = ExactAccumulation(accelerator, model)                      # + after prepare()
    for batch in loader:
        with accelerator.accumulate(model):
            logits = model(input_ids=batch["input_ids"]).logits
            loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])  # a sum
            exact.backward(loss)                                       # was accelerator.backward
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

What Accelerate does alone: ``accelerator.backward(loss)`` divides every micro-batch's loss by
``gradient_accumulation_steps`` — each micro-batch's own mean weighs the same whatever its number
of real tokens, and a short last cycle (``sync_with_dataloader``) is still divided by the nominal
K. What :class:`ExactAccumulation` changes: it hands ``accelerator.backward`` the micro-batch's
``c · sum`` and, right after the backward of the cycle's last micro-batch (``sync_gradients``),
divides the gradient by the cycle's item count summed over micro-batches and processes
(:mod:`bigbatch.integrations._rule`). Everything else — ``no_sync``, the fp16 grad scaler,
autocast, ``clip_grad_norm_``, the prepared optimizer and scheduler, ``save_state`` — is
Accelerate's, unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..loss import LossSum
from . import IntegrationError
from ._rule import CycleTotals, ExactCycle

__all__ = ["ExactAccumulation"]


class ExactAccumulation:
    """``exact.backward(loss_sum)`` in place of ``accelerator.backward(loss)``.

    Args:
        accelerator: the ``accelerate.Accelerator`` (its ``gradient_accumulation_steps`` is K).
        model: the model being trained (prepared or not: the parameters are the same).

    Raises:
        IntegrationError: DeepSpeed or Megatron-LM (they scale and reduce gradients themselves;
            for DeepSpeed use ``bigbatch.integrations.deepspeed``), or FSDP version 1.

    Attributes:
        loss: the exact mean loss of the last finished cycle, over every item of every
            micro-batch and process (NaN before the first); log it when ``sync_gradients``.
        count: the items that mean covers.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module) -> None:
        if not hasattr(accelerator, "backward") or not hasattr(accelerator, "sync_gradients"):
            raise IntegrationError(
                f"ExactAccumulation(accelerator, model): accelerator must be the "
                f"accelerate.Accelerator, got {type(accelerator).__name__}")
        kind = str(getattr(accelerator, "distributed_type", ""))
        if "DEEPSPEED" in kind or "MEGATRON" in kind:
            raise IntegrationError(
                f"ExactAccumulation: Accelerate with {kind.split('.')[-1]} scales and reduces "
                "gradients itself; for DeepSpeed use bigbatch.integrations.deepspeed.ExactEngine")
        if "FSDP" in kind and not getattr(accelerator, "is_fsdp2", False):
            raise IntegrationError("ExactAccumulation: FSDP version 1 keeps flat, unsharded "
                                   "gradients it owns; use FSDP version 2 (fsdp_version=2) or DDP")
        if not isinstance(model, torch.nn.Module):
            raise IntegrationError(
                f"ExactAccumulation(accelerator, model): model must be the torch.nn.Module being "
                f"trained, got {type(model).__name__}")
        self.accelerator, self.model = accelerator, model
        self._cycle = ExactCycle("ExactAccumulation.backward")

    def backward(self, loss: LossSum, **kwargs: Any) -> None:
        """Backpropagate one micro-batch's loss sum; after the cycle's last one, normalize.

        Args:
            loss: the micro-batch's :class:`~bigbatch.LossSum` (summed loss, item count).
            **kwargs: passed on to ``accelerator.backward``.

        Raises:
            LossError: ``loss`` is not a :class:`~bigbatch.LossSum` (a bare mean has no count).
        """
        acc = self.accelerator
        k = acc.gradient_accumulation_steps
        acc.backward(self._cycle.scaled(loss, expected_micro=k, reduce_sum=self._reduce_sum),
                     **kwargs)
        if acc.sync_gradients:  # the cycle's last micro-batch: its backward synced the ranks
            self._cycle.finish(self.model.parameters(), divisor=k, world=acc.num_processes,
                               reduce_sum=self._reduce_sum)

    @property
    def last(self) -> CycleTotals:
        """``(loss, count)`` of the last finished cycle."""
        return self._cycle.last

    @property
    def loss(self) -> float:
        return self._cycle.last.loss

    @property
    def count(self) -> int:
        return self._cycle.last.count

    def state_dict(self) -> dict[str, Any]:
        """For ``accelerator.register_for_checkpointing(exact)``: the prescale only (the update
        does not depend on it; it keeps gradient range across a resume)."""
        return self._cycle.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cycle.load_state_dict(state)

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        if acc.num_processes == 1:
            return t
        return acc.reduce(t.to(acc.device), reduction="sum")
