"""What torch.distributed says about this process: is there a process group, how big, which rank.

The default process group as the library sees it: the default world size of a
:class:`~bigbatch.BatchPlan` and the ranks whose embeddings :func:`~bigbatch.contrastive_step`
gathers are read here. (The engine's gradient sync asks the *model's* process group, which may be
another one: :mod:`bigbatch.engine.sync`.) Without a process group this is a world of one.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["active", "rank", "world_size"]


def active() -> bool:
    """True when torch.distributed is available and a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The default process group's size, else 1."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank in the default process group, else 0."""
    return dist.get_rank() if active() else 0
