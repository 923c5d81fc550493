"""Mixed precision for accumulation: autocast, fp16 loss scaling, fp32 gradient accumulation.

- ``"fp32"``: no autocast; gradients accumulate in the parameters' own dtype.
- ``"bf16"``: forward under ``torch.autocast(dtype=bfloat16)``. Parameters kept in float32 get
  float32 gradients. Parameters stored in bfloat16/float16 get a float32 accumulation buffer: after
  each micro-batch's backward their low-precision gradient is added into it and released, so the
  K-term sum is rounded once (when it is handed to the optimizer), not K times.
- ``"fp16"``: forward under ``torch.autocast(dtype=float16)`` with a ``torch.amp.GradScaler``; the
  loss is scaled before every backward and the gradient unscaled once per optimizer step.

The policy owns everything precision touches: the forward's autocast, each micro-batch's backward
(seeded with the engine's prescale ``c``, times the loss scale under fp16) and, once per cycle, the
step — normalize by the factor the engine gives, unscale, measure, clip, hand the float32 buffers
to the optimizer, step the optimizer (through the scaler under fp16) and the scheduler. Without
fp16 the normalization is folded into the clipping factor: one pass over the gradients.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal, get_args

import torch

from ..errors import BigBatchError

__all__ = ["Precision", "PrecisionPolicy", "total_norm"]

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPE = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOW = (torch.bfloat16, torch.float16)


class PrecisionPolicy:
    """Autocast, loss scaling and float32 accumulation buffers for one precision setting.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        model: the model whose parameters are trained.
        device: where the model runs (decides the autocast device type).

    Raises:
        BigBatchError: unknown precision, or ``"fp16"`` with parameters not in float32.
    """

    def __init__(self, precision: str, model: torch.nn.Module, device: torch.device) -> None:
        if precision not in get_args(Precision):
            raise BigBatchError(
                f"precision must be one of {', '.join(get_args(Precision))}, got {precision!r}"
            )
        self.precision: Precision = precision  # type: ignore[assignment]
        self.device = device
        self._low = [p for p in model.parameters() if p.requires_grad and p.dtype in _LOW]
        self._low_ids = {id(p) for p in self._low}
        self._bufs: list[torch.Tensor | None] = [None] * len(self._low)
        self.scaler: torch.amp.GradScaler | None = None
        self._seed: torch.Tensor | None = None  # backward's seed, the prescale, made once per c
        self._seed_value: float | None = None
        if precision == "fp16":
            if self._low:
                raise BigBatchError(
                    f"precision='fp16' needs float32 parameters, but {len(self._low)} are "
                    f"{self._low[0].dtype}: the grad scaler cannot unscale half-precision "
                    "gradients. Keep the model in float32 (autocast runs the math in float16) "
                    "or use precision='bf16'"
                )
            self.scaler = torch.amp.GradScaler(device.type)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward pass runs in."""
        dtype = _AUTOCAST_DTYPE[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss_sum: torch.Tensor, c: float) -> None:
        """Backpropagate ``c · loss_sum`` (times the loss scale under fp16), then move
        low-precision gradients into their float32 buffers.

        Without a scaler, backward is seeded with ``c`` (``d(c·sum)/d(sum) = c``): no
        multiplication node per micro-batch.
        """
        if self.scaler is None:
            seed = self._seed
            if (seed is None or seed.dtype != loss_sum.dtype or seed.device != loss_sum.device
                    or self._seed_value != c):
                seed = torch.full((), c, dtype=loss_sum.dtype, device=loss_sum.device)
                self._seed, self._seed_value = seed, c
            loss_sum.backward(seed)
        else:
            self.scaler.scale(loss_sum * c).backward()
        self.collect()

    def apply(self, grads: list[torch.Tensor], factor: float, *, optimizer: torch.optim.Optimizer,
              scheduler: Any, clip: float | None, sharded: bool = False,
              ) -> tuple[float, str | None]:
        """Normalize, unscale, clip and step: the once-per-cycle half. Returns (norm, skip reason).

        The gradient handed to the optimizer is ``g = factor · G`` (``G`` the accumulated
        tensors, :meth:`grads`), clipped to ``clip`` as ``clip_grad_norm_`` would:
        ``g ← g · min(1, clip / (‖g‖ + 1e-6))``. The norm is ``‖g‖`` before clipping. A
        non-finite norm skips the step ("non-finite gradient", or "fp16 overflow", which also
        lowers the loss scale); the scheduler steps only with the optimizer.

        ``torch._foreach_*`` kernels are the ones ``torch.optim`` and ``clip_grad_norm_`` use:
        one launch per group of tensors instead of one per parameter. ``sharded``: FSDP2's
        DTensor gradients, which take a Python scalar instead of a tensor factor.
        """
        scaler = self.scaler
        if scaler is not None:  # unscale_ reads the gradient as the optimizer would: scale first
            if grads:
                torch._foreach_mul_(grads, factor)
            factor = 1.0
            scaler.unscale_(optimizer)
        norm = total_norm(grads) * factor  # ‖f·G‖ = f·‖G‖
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            if scaler is None:
                return grad_norm, "non-finite gradient"
            scaler.update()  # records the overflow and lowers the scale; no optimizer step
            return grad_norm, "fp16 overflow"
        if grads and clip is not None:  # one pass: G × f × min(1, clip / (‖g‖ + 1e-6))
            if sharded:
                torch._foreach_mul_(grads, factor * min(1.0, clip / (grad_norm + 1e-6)))
            else:
                coef = torch.clamp(clip / (norm + 1e-6), max=1.0) * factor
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        elif grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)
        self.write_back()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return grad_norm, None

    def collect(self) -> None:
        """After a backward: move low-precision gradients into their float32 buffers."""
        for i, p in enumerate(self._low):
            if p.grad is None:
                continue
            buf = self._bufs[i]
            if buf is None:
                self._bufs[i] = p.grad.to(torch.float32)
            else:
                buf.add_(p.grad)
            p.grad = None

    def grads(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """The tensors holding the cycle's accumulated gradient (float32 or wider)."""
        own = [p.grad for p in params if p.grad is not None and id(p) not in self._low_ids]
        return own + [b for b in self._bufs if b is not None]

    def write_back(self) -> None:
        """Hand the float32 buffers to the optimizer as the low-precision parameters' ``.grad``."""
        for p, buf in zip(self._low, self._bufs):
            if buf is not None:
                p.grad = buf.to(p.dtype)

    def buffer_state(self) -> list[torch.Tensor | None]:
        """Clones of the float32 buffers of a cycle in flight (for checkpoints)."""
        return [None if b is None else b.clone() for b in self._bufs]

    def load_buffer_state(self, bufs: list[torch.Tensor | None]) -> None:
        """Restore :meth:`buffer_state`."""
        if len(bufs) != len(self._low):
            raise BigBatchError(
                f"checkpoint holds {len(bufs)} float32 gradient buffers, this model needs "
                f"{len(self._low)}; resume with the model and precision of the checkpoint"
            )
        self._bufs = [None if b is None else b.to(p.device, torch.float32)
                      for p, b in zip(self._low, bufs)]

    def release(self) -> None:
        """Drop the float32 buffers (the end of a cycle)."""
        self._bufs = [None] * len(self._low)

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale, or None when no scaler is used."""
        return None if self.scaler is None else float(self.scaler.get_scale())



def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradient tensors, in the widest dtype among them.

    Sharded (DTensor) gradients of FSDP2 go through ``torch.nn.utils.get_total_norm``, which
    combines the shards' partial norms across ranks.
    """
    if not grads:
        return torch.zeros(())
    if type(grads[0]).__name__ == "DTensor":
        return torch.nn.utils.get_total_norm(grads).full_tensor()  # type: ignore[attr-defined]
    norms = torch._foreach_norm(grads)
    dtype = max((n.dtype for n in norms), key=lambda d: torch.finfo(d).bits)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norms]))
