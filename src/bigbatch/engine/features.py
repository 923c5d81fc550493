"""What rides along a cycle without changing its rule: the noise scale and pooled BatchNorm.

A :class:`Feature` is told where the cycle is — it began, a micro-batch's backward ended, a piece
of a micro-batch failed and is being retried, the cycle ended with or without a step, it was
discarded — and may add a small tensor of sums to the one all-reduce the engine makes per cycle.
It returns what it wants reported in :class:`~bigbatch.StepStats`. It never touches the gradient
or the optimizer, so whatever it does, the update stays ``Σ_k ∇sum_k / Σ_k count_k``.

Every hook has a no-op default; a feature overrides the ones it needs.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

from ..errors import BigBatchError
from ..noise import MicroGradNorms
from ..pooled import PooledBatchNorm

__all__ = ["BatchNormMode", "BatchNormWarning", "Feature", "NoiseFeature", "PooledFeature",
           "make_features", "warn_batchnorm"]

BatchNormMode = Literal["warn", "pooled", "ignore"]


class Feature:
    """The hooks a cycle offers (see the module docstring); all no-ops here."""

    name = "feature"  # its key in the engine's state_dict

    def begin_cycle(self) -> None:
        """The cycle's first micro-batch is about to run."""

    def after_backward(self, count: int | torch.Tensor, scale: float) -> None:
        """A micro-batch's backward (of ``scale × sum`` over ``count`` items) finished."""

    def mark(self) -> Any:
        """Before a micro-batch (or a piece) that may be retried: a token for :meth:`undo`."""

    def undo(self, token: Any, reached_gradients: bool) -> None:
        """That micro-batch ran out of memory and will be rerun in pieces: forget it.
        ``reached_gradients``: its backward had already added to some ``.grad``."""

    def local_sums(self) -> torch.Tensor | None:
        """float64 sums to add up over ranks in the cycle's one all-reduce (None: nothing)."""
        return None

    def end_cycle(self, sums: torch.Tensor | None, took_step: bool, grad_norm: float,
                  count: int) -> dict[str, Any]:
        """The cycle ended (the step taken, or skipped); returns :class:`StepStats` fields.
        ``sums``: :meth:`local_sums` added up over ranks."""
        return {}

    def discard(self) -> None:
        """Drop the cycle in flight."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint taken in the middle of a cycle must hold."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`discard`)."""


class NoiseFeature(Feature):
    """The gradient noise scale of each cycle (:mod:`bigbatch.noise`): ``StepStats.noise``.

    Needs two micro-batches with items over all ranks; a micro-batch whose backward failed after
    reaching some gradients leaves its norm unknown, and so the cycle's estimate (None).
    """

    name = "noise"

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.norms = MicroGradNorms(list(model.parameters()), device)
        self._complete = True

    def begin_cycle(self) -> None:
        self.norms.reset()
        self._complete = True

    def after_backward(self, count: int | torch.Tensor, scale: float) -> None:
        self.norms.end_micro(count, scale)

    def undo(self, token: Any, reached_gradients: bool) -> None:
        self.norms.drop_micro()
        self._complete = self._complete and not reached_gradients

    def local_sums(self) -> torch.Tensor:
        return self.norms.local_sums()

    def end_cycle(self, sums: torch.Tensor | None, took_step: bool, grad_norm: float,
                  count: int) -> dict[str, Any]:
        if not (took_step and self._complete and sums is not None):
            return {}
        return {"noise": self.norms.estimate(sums, grad_norm**2, count)}

    def discard(self) -> None:
        self.norms.reset()
        self._complete = True

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.norms.local_sums().clone(), "complete": self._complete}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sums" in state:
            self.norms.local_sums().copy_(state["sums"])
            self._complete = bool(state["complete"])


class PooledFeature(Feature):
    """BatchNorm running statistics pooled over the cycle (:class:`~bigbatch.PooledBatchNorm`):
    one update per optimizer step taken; a skipped step leaves them untouched, like the weights."""

    name = "batchnorm"

    def __init__(self, model: torch.nn.Module) -> None:
        self.pool = PooledBatchNorm(model)

    def begin_cycle(self) -> None:
        self.pool.discard()

    def mark(self) -> Any:
        return self.pool.snapshot()

    def undo(self, token: Any, reached_gradients: bool) -> None:
        self.pool.rollback(token)

    def end_cycle(self, sums: torch.Tensor | None, took_step: bool, grad_norm: float,
                  count: int) -> dict[str, Any]:
        if took_step:
            self.pool.step()
        else:
            self.pool.discard()
        return {}

    def discard(self) -> None:
        self.pool.discard()

    def state_dict(self) -> dict[str, Any]:
        return self.pool.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state)


class BatchNormWarning(UserWarning):
    """The model has layers whose statistics span the micro-batch, not the effective batch."""


def warn_batchnorm(model: torch.nn.Module) -> None:
    """Warn (:class:`BatchNormWarning`) when ``model`` has BatchNorm layers, naming them."""
    names = [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    if not names:
        return
    shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
    warnings.warn(
        f"the model has BatchNorm layers ({shown}): under gradient accumulation their batch "
        "statistics and running-statistic updates see one micro-batch, not the effective batch, "
        "so training is not equivalent to the full batch. If that matters, convert them "
        "(bigbatch.convert_batchnorm(model, to='group' or 'freeze')) or pool their running "
        "statistics (Accumulator(..., batchnorm='pooled')); batchnorm='ignore' silences this",
        BatchNormWarning,
        stacklevel=4,
    )


def make_features(model: torch.nn.Module, device: torch.device, sync_kind: str, *,
                  noise_scale: bool, batchnorm: str) -> list[Feature]:
    """The features an :class:`~bigbatch.Accumulator`'s arguments ask for (warning about
    BatchNorm with ``batchnorm="warn"``).

    Raises:
        BigBatchError: an unknown ``batchnorm``; the noise scale under FSDP2.
    """
    if batchnorm not in ("warn", "pooled", "ignore"):
        raise BigBatchError(f"batchnorm must be 'warn', 'pooled' or 'ignore', got {batchnorm!r}")
    if noise_scale and sync_kind == "fsdp2":
        raise BigBatchError("noise_scale needs each rank's micro-batch gradient, which FSDP2 "
                            "shards away; use DDP, or turn the noise scale off")
    features: list[Feature] = [NoiseFeature(model, device)] if noise_scale else []
    if batchnorm == "pooled":
        features.append(PooledFeature(model))
    elif batchnorm == "warn":
        warn_batchnorm(model)
    return features
