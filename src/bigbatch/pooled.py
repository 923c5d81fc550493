"""BatchNorm running statistics pooled over the cycle: one update per optimizer step.

Under accumulation a BatchNorm layer sees K micro-batches per optimizer step and, left alone, moves
its running statistics K times, each towards one micro-batch's statistics. :class:`PooledBatchNorm`
keeps the layers (each forward still normalizes with its micro-batch's statistics) but holds their
running statistics still during the cycle, pools what each micro-batch gave, and makes the ONE
update a full-batch BatchNorm would have made from the same inputs.

Pooling (the parallel-variance formula of Chan, Golub & LeVeque): micro-batch k gives per channel
the count ``n_k`` (elements per channel), mean ``m_k`` and biased variance ``v_k``; over the cycle

    N = Σ n_k,   M = Σ n_k m_k / N,   V = Σ n_k (v_k + (m_k − M)²) / N

The ``(m_k − M)²`` term is the variance between micro-batches; averaging the ``v_k`` alone (as the
AccumBN layer of the TensorFlow gradient-accumulator package does) underestimates the variance.
Then, once per layer, torch's own update with the unbiased variance:

    num_batches_tracked += 1;  f = momentum, or 1 / num_batches_tracked when momentum is None
    running_mean ← (1 − f) · running_mean + f · M
    running_var  ← (1 − f) · running_var  + f · V · N / (N − 1)

Exact for the inputs each layer received. A layer downstream of another BatchNorm receives inputs
normalized with micro-batch statistics, so they, and what it pools, differ from a full-batch run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .batchnorm import batchnorm_layers
from .errors import BigBatchError

__all__ = ["PooledBatchNorm"]


@dataclass
class _Pool:
    """One layer's statistics over the forwards so far: count, mean and ``M2 = N · V`` (float64)."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor


class PooledBatchNorm:
    """Pools the BatchNorm statistics of a cycle's forwards into one running-statistics update.

    Hooks every BatchNorm layer of ``model`` that keeps running statistics. While a layer runs in
    training mode its running buffers are swapped for scratch copies, so its own update lands
    there and is dropped; its input's per-channel count, mean and biased variance are pooled in
    float64. :meth:`step` applies one update per layer (see the module docstring); :meth:`discard`
    drops what was pooled. Layers in eval mode, or with ``track_running_stats=False``, behave as
    usual. :class:`~bigbatch.Accumulator` with ``batchnorm="pooled"`` makes one and calls it.

    ::

        pool = bigbatch.PooledBatchNorm(model)
        for micro in micro_batches:
            loss_of(model, micro).backward()
        optimizer.step()
        pool.step()      # every training-mode forward since the last step() or discard()

    Args:
        model: the module whose BatchNorm layers to pool (a DDP-wrapped one too; under DDP each
            process pools its own micro-batches, as each process's BatchNorm sees its own batch).

    Raises:
        BigBatchError: the model has a ``SyncBatchNorm`` (its statistics span processes, which
            pooling on one process would not).

    Each call of a layer is one batch of its inputs: a layer called several times per forward gets
    one update over all its calls, where full-batch BatchNorm would make one per call. Activation
    checkpointing over a layer runs its forward twice and would pool the inputs twice.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        layers = batchnorm_layers(model)
        sync = [name for name, m in layers if isinstance(m, torch.nn.SyncBatchNorm)]
        if sync:
            raise BigBatchError(
                f"PooledBatchNorm cannot pool SyncBatchNorm layers ({', '.join(sync)}): their "
                "statistics span processes. Use plain BatchNorm layers (each process then pools "
                "its own micro-batches) or convert them with bigbatch.convert_batchnorm")
        self._names = {m: name for name, m in layers if m.track_running_stats}
        self._pools: dict[_BatchNorm, _Pool] = {}
        self._stash: dict[_BatchNorm, tuple[torch.Tensor | None, ...]] = {}
        self._handles = []
        for m in self._names:
            self._handles.append(m.register_forward_pre_hook(self._before))
            self._handles.append(m.register_forward_hook(self._after, always_call=True))

    @property
    def layers(self) -> list[str]:
        """Names of the pooled layers (those that keep running statistics)."""
        return list(self._names.values())

    @property
    def pending(self) -> bool:
        """Whether statistics are pooled and waiting for :meth:`step`."""
        return bool(self._pools)

    def step(self) -> int:
        """Apply one running-statistics update per layer from what was pooled, then reset.

        Returns:
            The number of layers updated (those that ran in training mode since the last reset).
        """
        self._restore()
        with torch.no_grad():
            for m, pool in self._pools.items():
                nbt = m.num_batches_tracked
                if nbt is not None:
                    nbt.add_(1)
                f = m.momentum if m.momentum is not None else 1.0 / float(nbt)  # type: ignore[arg-type]
                unbiased = pool.m2 / (pool.count - 1) if pool.count > 1 else pool.m2
                for buf, value in ((m.running_mean, pool.mean), (m.running_var, unbiased)):
                    assert buf is not None  # hooked layers track running statistics
                    buf.copy_((1.0 - f) * buf.double() + f * value)
        updated = len(self._pools)
        self._pools.clear()
        return updated

    def discard(self) -> None:
        """Drop what was pooled; the running statistics stay as they were before it."""
        self._restore()
        self._pools.clear()

    def remove(self) -> None:
        """Discard, and take the hooks off: the layers are plain BatchNorm again."""
        self.discard()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def snapshot(self) -> dict[_BatchNorm, _Pool]:
        """What is pooled so far, cheaply (pooling replaces tensors, never writes into them)."""
        return {m: _Pool(p.count, p.mean, p.m2) for m, p in self._pools.items()}

    def rollback(self, snapshot: dict[_BatchNorm, _Pool]) -> None:
        """Forget the forwards since :meth:`snapshot` (one that ran out of memory, say)."""
        self._restore()
        self._pools = dict(snapshot)

    def state_dict(self) -> dict[str, Any]:
        """What is pooled so far, by layer name (for checkpoints taken in the middle of a cycle)."""
        return {self._names[m]: {"count": p.count, "mean": p.mean.cpu(), "m2": p.m2.cpu()}
                for m, p in self._pools.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the pooled statistics with those :meth:`state_dict` returned.

        Raises:
            BigBatchError: a layer name that this model has no pooled layer of.
        """
        by_name = {name: m for m, name in self._names.items()}
        unknown = sorted(set(state) - set(by_name))
        if unknown:
            raise BigBatchError(f"pooled BatchNorm statistics for unknown layers "
                                f"{', '.join(unknown)}; resume with the model they were taken from")
        self.discard()
        for name, p in state.items():
            dev = by_name[name].running_mean.device  # type: ignore[union-attr]
            self._pools[by_name[name]] = _Pool(int(p["count"]), p["mean"].to(dev, torch.float64),
                                               p["m2"].to(dev, torch.float64))

    # -- hooks -------------------------------------------------------------------------------

    def _before(self, m: _BatchNorm, args: tuple[Any, ...]) -> None:
        if not m.training:
            return
        self._restore(m)  # a previous forward of it that raised
        originals = (m.running_mean, m.running_var, m.num_batches_tracked)
        self._stash[m] = originals
        # Scratch copies take the layer's own update; the originals are never written in place,
        # which would also break backward (batch_norm saves the running buffers for it).
        m.running_mean, m.running_var, m.num_batches_tracked = (
            None if t is None else t.clone() for t in originals)

    def _after(self, m: _BatchNorm, args: tuple[Any, ...], output: Any) -> None:
        if m not in self._stash:
            return
        self._restore(m)
        if output is None:  # the forward raised
            return
        x = args[0].detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        n = x.numel() // x.shape[1]
        mean, m2 = mean.double(), var.double() * n
        pool = self._pools.get(m)
        if pool is None:
            self._pools[m] = _Pool(n, mean, m2)
            return
        total = pool.count + n
        delta = mean - pool.mean
        pool.mean = pool.mean + delta * (n / total)
        pool.m2 = pool.m2 + m2 + delta.square() * (pool.count * n / total)
        pool.count = total

    def _restore(self, only: _BatchNorm | None = None) -> None:
        for m in [only] if only is not None else list(self._stash):
            originals = self._stash.pop(m, None)  # type: ignore[arg-type]
            if originals is not None:
                m.running_mean, m.running_var, m.num_batches_tracked = originals  # type: ignore[union-attr]
