"""Data parallelism for the engine: one gradient sync per optimizer step, and ranks that agree.

The :class:`~bigbatch.Accumulator` finds out from the model how gradients cross ranks:

* ``DistributedDataParallel``: the cycle's first K−1 micro-batches run under ``model.no_sync()``,
  the last one syncs (DDP all-reduces its buckets while that backward runs).
* FSDP2 (``torch.distributed.fsdp.fully_shard``): ``set_requires_gradient_sync(False)`` for the
  first K−1 micro-batches (unsharded gradients are kept until the last one), or, with
  ``sync="micro"``, a reduce-scatter after every micro-batch (sharded gradients only: less memory,
  K times the communication).
* a plain module in a process group of more than one rank is refused: its gradients would never
  cross ranks and the replicas would drift apart silently. So is FSDP1, whose ``no_sync`` keeps
  unsharded gradients with a different contract; use ``fully_shard``.

Both wrappers *average* gradients over the W ranks. With ``c`` the engine's prescale, rank r's
backward adds ``c·Σ_{i∈r} ∇ℓ_i``, so after the sync every rank holds ``(c/W)·Σ_i ∇ℓ_i`` and the
engine multiplies by ``W / (c·N)``, with ``N`` the item count summed over all ranks (one small
all-reduce per cycle, which also carries the loss sum). The result is ``Σ_i ∇ℓ_i / N``: exact, also
when ranks hold different numbers of items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import BigBatchError

__all__ = ["DistributedError", "GradSync", "SyncMode"]

SyncMode = Literal["cycle", "micro"]

try:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
except ImportError:  # torch built without distributed support
    FSDPModule = FullyShardedDataParallel = None  # type: ignore[assignment,misc]


class DistributedError(BigBatchError):
    """Ranks disagree (on K, on whether data is left) or the model is not set up for them."""


class GradSync:
    """How one model's gradients cross ranks; a no-op outside a process group.

    Args:
        model: the module the engine trains (the DDP or FSDP2 module itself, not its inner one).
        mode: ``"cycle"`` syncs once per optimizer step; ``"micro"`` after every micro-batch.

    Raises:
        DistributedError: the model cannot be trained exactly in this process group (see the
            module docstring), or ``mode`` is unknown.
    """

    def __init__(self, model: torch.nn.Module, mode: SyncMode = "cycle") -> None:
        if mode not in ("cycle", "micro"):
            raise DistributedError(f"sync must be 'cycle' or 'micro', got {mode!r}")
        self.mode: SyncMode = mode
        self.model = model
        self.group = None
        if isinstance(model, DistributedDataParallel):
            self.kind = "ddp"
            self.group = model.process_group
        elif FSDPModule is not None and isinstance(model, FSDPModule):
            self.kind = "fsdp2"
        elif FullyShardedDataParallel is not None and isinstance(model, FullyShardedDataParallel):
            raise DistributedError(
                "FSDP1 (FullyShardedDataParallel) is not supported: wrap the model with "
                "torch.distributed.fsdp.fully_shard (FSDP2) or DistributedDataParallel")
        else:
            self.kind = "none"
            inner = [name for name, m in model.named_modules()
                     if FSDPModule is not None and isinstance(m, FSDPModule)]
            if inner:
                raise DistributedError(
                    f"submodules {', '.join(inner[:3])} are fully_shard-ed but the root module is "
                    "not: call fully_shard(model) on the root too and give the engine that")
        ready = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(self.group) if ready else 1
        self.rank = dist.get_rank(self.group) if ready else 0
        if self.kind == "none" and self.world_size > 1:
            raise DistributedError(
                f"the model is a plain {type(model).__name__} in a process group of "
                f"{self.world_size} ranks, so its gradients would never be synced: wrap it in "
                "torch.nn.parallel.DistributedDataParallel or torch.distributed.fsdp.fully_shard")
        self.active = self.kind != "none"

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[bool]:
        """Context for one micro-batch's forward and backward; yields whether it syncs.

        It syncs when it is the cycle's ``last`` or when ``mode == "micro"``.
        """
        sync = last or self.mode == "micro"
        if self.kind == "ddp" and not sync:
            with self.model.no_sync():  # type: ignore[operator]
                yield False
        elif self.kind == "fsdp2":
            self.model.set_requires_gradient_sync(sync)  # type: ignore[operator]
            yield sync
        else:
            yield sync

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over ranks (in place, and returned); identity outside a group."""
        if self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.group)
        return values

    def all_reduce_sums(self, parts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Sum several small float64 tensors over ranks in one all-reduce; None entries stay."""
        present = [p for p in parts if p is not None]
        flat = self.all_reduce_sum(torch.cat([p.reshape(-1) for p in present]))
        out: list[torch.Tensor | None] = []
        at = 0
        for p in parts:
            out.append(None if p is None else flat[at:at + p.numel()].view_as(p))
            at += 0 if p is None else p.numel()
        return out

    def agree_on_micro_batches(self, n: int, device: torch.device) -> None:
        """Check every rank has ``n`` micro-batches this cycle, before any collective depends on it.

        Raises:
            DistributedError: on every rank, when they differ (e.g. one ran out of data).
        """
        if self.world_size == 1:
            return
        both = torch.tensor([n, -n], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        most, fewest = int(both[0]), -int(both[1])
        if most != fewest:
            raise DistributedError(
                f"ranks disagree on this cycle's micro-batches (rank {self.rank} has {n}; fewest "
                f"{fewest}, most {most}): a rank ran out of data or was given another K. Every "
                "rank stopped here; give each rank the same number of micro-batches per step")

    def reduce_unsynced(self, grads: list[torch.Tensor]) -> None:
        """Average gradients that no micro-batch synced (DDP only), as DDP itself would have, in
        buckets of up to 25 MiB (DDP's default bucket size). DDP communication hooks are not used.

        Raises:
            DistributedError: under FSDP2, which keeps such gradients unsharded and unreachable.
        """
        if self.kind == "fsdp2":
            raise DistributedError(
                "the cycle ended without a micro-batch that synced gradients: under FSDP2 pass "
                "last=True to the final accumulate() of each cycle (or use Accumulator.step)")
        for bucket in _buckets(grads):  # a few large all-reduces rather than one per tensor
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            torch._foreach_copy_(bucket, [part.view_as(g) for g, part in
                                          zip(bucket, flat.split([g.numel() for g in bucket]))])
        if grads:
            torch._foreach_div_(grads, float(self.world_size))


def _buckets(tensors: list[torch.Tensor], limit: int = 25 * 2**20) -> list[list[torch.Tensor]]:
    """Tensors grouped by dtype and device into lists of at most ``limit`` bytes (or one tensor)."""
    out: list[list[torch.Tensor]] = []
    open_: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], int]] = {}
    for t in tensors:
        key = (t.dtype, t.device)
        bucket, size = open_.get(key, ([], 0))
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > limit:
            out.append(bucket)
            bucket, size = [], 0
        bucket.append(t)
        open_[key] = (bucket, size + nbytes)
    out.extend(bucket for bucket, _ in open_.values() if bucket)
    return out
