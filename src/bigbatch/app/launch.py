"""``bigbatch train`` under ``torchrun``: the process group, the device, the wrapped model.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; when they
are there, :func:`setup` joins the process group (NCCL for CUDA, gloo for CPU) and puts each rank
on ``cuda:LOCAL_RANK``. Without them everything here is a no-op for one process.

Ranks must never wait for each other forever: every step that can fail on one rank only (reading
the data, checking the run folder, loading a checkpoint) ends in :meth:`Ranks.agree`, a small
all-reduce, so that either all ranks go on or all stop with the failing rank's message.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..engine.sync import DistributedError
from ..errors import BigBatchError

__all__ = ["Ranks", "setup", "wrap_model"]

T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place among the data-parallel ranks (``world_size == 1``: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 writes the run folder, the checkpoints and the progress lines."""
        return self.rank == 0

    def agree(self, ok: bool, device: torch.device) -> bool:
        """True when every rank's ``ok`` is True (one all-reduce); alone, ``ok`` itself."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) == 0

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value`` (one all-reduce); alone, ``value`` itself."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable; tensors come back on the CPU), in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, _to_cpu(obj))
        return out

    def together(self, what: str, device: torch.device, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raises a :class:`BigBatchError` on any rank, raise on
        all of them (the failing rank with its own message), so none is left waiting."""
        try:
            result, error = fn(), None
        except BigBatchError as e:
            result, error = None, e
        if not self.agree(error is None, device):
            if error is not None:
                raise error
            raise DistributedError(f"{what} failed on another rank (its message says why); "
                                   f"rank {self.rank} stopped too")
        return result  # type: ignore[return-value]

    def close(self, wait: bool = True) -> None:
        """Leave the process group this process created.

        ``wait``: first wait for every rank at a barrier (a normal end; after an error a rank may
        be gone, so don't). Objects that still hold the group (DDP's reducer, FSDP2's state, often
        in reference cycles) are collected before it is destroyed: left for interpreter exit,
        gloo's threads were torn down in the wrong order and the process aborted ("terminate
        called without an active exception") in about one run in three.
        """
        if self.owns_group and dist.is_initialized():
            if wait and self.world_size > 1:
                dist.barrier()
            gc.collect()
            dist.destroy_process_group()


def setup(device_name: str) -> tuple[Ranks, str]:
    """Join the torchrun process group if there is one; returns the ranks and the device to use.

    Args:
        device_name: the ``--device`` value; ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` under
            torchrun when CUDA is there.

    Raises:
        DistributedError: the torchrun variables are incomplete, or a device is named by index
            under more than one rank (``--device cuda:0`` would put every rank on one GPU).
    """
    if "WORLD_SIZE" not in os.environ:
        return Ranks(), device_name
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise DistributedError("WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers; "
                               "launch with torchrun, which sets them all") from None
    if world == 1 and not dist.is_initialized():
        return Ranks(), device_name
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:") and world > 1:
        raise DistributedError(f"--device {device_name} under {world} ranks would put them all on "
                               "one GPU; use --device cuda (each rank takes cuda:LOCAL_RANK)")
    if use_cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=_dt.timedelta(minutes=10))
    return Ranks(dist.get_rank(), dist.get_world_size(), local, owns), device_name


def wrap_model(model: torch.nn.Module, parallel: str, ranks: Ranks,
               blocks: list[torch.nn.Module]) -> torch.nn.Module:
    """The module the engine trains: DDP, or FSDP2 with each of ``blocks`` sharded on its own.

    Alone, the model itself. Under FSDP2 ``model`` is changed in place (its parameters become
    sharded DTensors), so build the optimizer after this.
    """
    if ranks.world_size == 1:
        return model
    if parallel == "ddp":
        device = next(model.parameters()).device
        ids: Any = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
