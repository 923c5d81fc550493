"""Exact accumulation in PyTorch Lightning 2.x: the :class:`ExactAccumulation` callback and
:func:`exact_loss`.

The change to a ``LightningModule`` trained with ``accumulate_grad_batches``::

    from bigbatch.integrations.lightning import ExactAccumulation, exact_loss

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["input_ids"])
        loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])  # a sum
        return exact_loss(self, loss)                         # was: return the mean loss

    trainer = L.Trainer(accumulate_grad_batches=8, gradient_clip_val=1.0,
                        callbacks=[ExactAccumulation()])      # + the callback

What Lightning does alone: it divides each ``training_step`` loss by ``accumulate_grad_batches``,
so every micro-batch's own mean weighs the same whatever its number of real tokens, and the
epoch's last, shorter cycle is still divided by the full K. What the integration changes:
:func:`exact_loss` hands Lightning ``c · sum`` of the micro-batch and records its count; in
``on_before_optimizer_step`` — after the cycle's last backward (and the AMP unscale), before
Lightning clips — the callback divides the gradient by the cycle's item count summed over
micro-batches and ranks (:mod:`bigbatch.integrations._rule`) and logs the exact mean loss once
per optimizer step. Lightning's clipping, optimizer and scheduler stepping, precision plugins,
checkpoints (the callback's state included) and DDP strategy run as before.

``ExactAccumulation`` subclasses ``lightning.pytorch.Callback`` (``pytorch_lightning.Callback``
when only ``pytorch_lightning`` is installed); the class is built on first use, so importing this
module does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..loss import LossSum, check_loss
from . import IntegrationError
from ._rule import CycleTotals, ExactCycle

if TYPE_CHECKING:
    from lightning.pytorch import Callback as _Callback
else:
    _Callback = object

__all__ = ["ExactAccumulation", "exact_loss"]

_MARK = "_bigbatch_exact_accumulation"


def _find(trainer: Any) -> Any:
    found = [cb for cb in trainer.callbacks if getattr(cb, _MARK, False)]
    if not found:
        raise IntegrationError(
            "exact_loss(...) needs the ExactAccumulation callback: "
            "Trainer(callbacks=[bigbatch.integrations.lightning.ExactAccumulation()], ...)")
    return found[0]


def exact_loss(module: Any, loss: LossSum) -> torch.Tensor:
    """What ``training_step`` returns for exact accumulation: ``c · sum`` of this micro-batch
    (Lightning divides it by ``accumulate_grad_batches`` and backpropagates it; the callback
    normalizes the cycle once, before clipping). Outside training (``validation_step``, no
    gradient) it returns the micro-batch's mean, ``sum / count``.

    Args:
        module: the ``LightningModule`` (``self`` in ``training_step``).
        loss: the micro-batch's :class:`~bigbatch.LossSum` (summed loss, item count).

    Raises:
        IntegrationError: the Trainer has no :class:`ExactAccumulation` callback.
        LossError: ``loss`` is not a :class:`~bigbatch.LossSum` (a bare mean has no count).
    """
    if not (module.training and torch.is_grad_enabled()):
        ls = check_loss(loss)
        return ls.sum / max(int(ls.count), 1)
    return _find(module.trainer).scaled(module.trainer, loss)


class _ExactAccumulationMixin:
    """The callback's behaviour, without a Lightning base class (see :class:`ExactAccumulation`)."""

    _bigbatch_exact_accumulation = True

    def __init__(self, log: str | None = "train_loss", prog_bar: bool = True) -> None:
        if log is not None and not (isinstance(log, str) and log):
            raise IntegrationError(f"ExactAccumulation(log=...) takes the name to log the exact "
                                   f"mean loss under, or None, got {log!r}")
        super().__init__()
        self.log_name, self.prog_bar = log, prog_bar
        self._cycle = ExactCycle("bigbatch.integrations.lightning.exact_loss")

    @property
    def last(self) -> CycleTotals:
        """``(loss, count)`` of the last optimizer step: the exact mean loss and its items."""
        return self._cycle.last

    def scaled(self, trainer: Any, loss: LossSum) -> torch.Tensor:
        return self._cycle.scaled(loss, expected_micro=trainer.accumulate_grad_batches,
                                  reduce_sum=lambda t: _reduce_sum(trainer, t))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        fix = None
        if not pl_module.automatic_optimization:
            fix = ("with manual optimization the training_step owns backward and stepping: "
                   "use bigbatch.Accumulator there instead of the callback")
        elif "DeepSpeed" in strategy:
            fix = "DeepSpeed scales gradients itself: use bigbatch.integrations.deepspeed"
        elif strategy == "FSDPStrategy":
            fix = ("FSDPStrategy (FSDP1) owns flat unsharded gradients: use strategy='ddp' or "
                   "ModelParallelStrategy (FSDP2)")
        if fix:
            raise IntegrationError(f"ExactAccumulation: {fix}")

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._cycle.discard()  # nothing carries over a cycle Lightning did not step

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        totals = self._cycle.finish(pl_module.parameters(),
                                    divisor=trainer.accumulate_grad_batches,
                                    world=trainer.world_size,
                                    reduce_sum=lambda t: _reduce_sum(trainer, t))
        if self.log_name:
            pl_module.log(self.log_name, totals.loss, on_step=True, on_epoch=False,
                          prog_bar=self.prog_bar, batch_size=max(totals.count, 1))

    def state_dict(self) -> dict[str, Any]:
        return self._cycle.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._cycle.load_state_dict(state_dict)


def _reduce_sum(trainer: Any, t: torch.Tensor) -> torch.Tensor:
    if trainer.world_size == 1:
        return t
    return trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum")


def _build() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        from pytorch_lightning import Callback

    class ExactAccumulation(_ExactAccumulationMixin, Callback):  # type: ignore[misc,valid-type]
        """Lightning callback: exact gradient accumulation with ``accumulate_grad_batches``.

        Each ``training_step`` returns :func:`exact_loss` of its micro-batch's
        :class:`~bigbatch.LossSum`. Once per optimizer step, after the cycle's last backward and
        before Lightning clips, the gradient becomes ``Σ_k ∇sum_k / Σ_k count_k`` over every
        micro-batch and rank (``trainer.accumulate_grad_batches``, a short last cycle and
        ``GradientAccumulationScheduler`` included).

        Args:
            log: the name the exact mean loss of each optimizer step is logged under
                (``self.log``, on step; None: not logged). ``callback.last`` holds it too.
            prog_bar: also show it in the progress bar.

        Raises:
            IntegrationError: at ``fit``: manual optimization, DeepSpeed, or FSDP1; at a step:
                a cycle whose micro-batches did not go through :func:`exact_loss`.
        """

    ExactAccumulation.__module__ = __name__
    return ExactAccumulation


def __getattr__(name: str) -> Any:
    if name == "ExactAccumulation":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    class ExactAccumulation(_ExactAccumulationMixin, _Callback):  # noqa: D101
        ...
