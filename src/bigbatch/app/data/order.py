"""The order of samples: which samples each optimizer step trains on.

The batch order is the heart of exactness: :func:`global_batches` yields the sample indices of each
optimizer step from ``(num_samples, global_batch, seed)`` alone. However a global batch is later cut
into micro-batches or spread over processes, the same samples are trained on at the same step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

__all__ = ["check_int", "epoch_seed", "eval_batches", "global_batches", "take_samples"]


def check_int(name: str, value: object, *, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} {value!r} must be an integer >= {minimum}")


def epoch_seed(seed: int, index: int, purpose: str = "") -> int:
    # A fresh generator per (seed, index) lets any step's draw be computed directly. Hashing the
    # pair (rather than e.g. seed * K + index) keeps different seeds from ever sharing a draw.
    tag = f"bigbatch:{seed}:{index}" + (f":{purpose}" if purpose else "")
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little") >> 1


def _epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def global_batches(
    num_samples: int, global_batch: int, seed: int, *, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Yield, forever, the sample indices of each optimizer step.

    Epoch ``e`` is a permutation of ``range(num_samples)`` drawn from a generator keyed on
    ``(seed, e)``; step ``s`` takes items ``s * global_batch`` to ``(s + 1) * global_batch`` of the
    epochs laid end to end, so a batch may straddle two epochs (or more, when ``global_batch >
    num_samples``). The sequence depends on the three positional arguments only (and on torch's
    ``randperm``, identical for a given torch version).

    Args:
        num_samples: size of the dataset.
        global_batch: samples per optimizer step, before any split into micro-batches.
        seed: any integer.
        start_step: first step to yield; reached directly, in time independent of its value, so a
            resumed run sees exactly the batches an uninterrupted one would.

    Returns:
        An infinite iterator of 1-D ``LongTensor`` of length ``global_batch``.

    Raises:
        ValueError: an argument is out of range (raised at the call, not on first ``next``).
    """
    check_int("num_samples", num_samples, minimum=1)
    check_int("global_batch", global_batch, minimum=1)
    check_int("start_step", start_step, minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed {seed!r} must be an integer")
    return _global_batches(num_samples, global_batch, seed, start_step)


def _global_batches(
    num_samples: int, global_batch: int, seed: int, start_step: int, start: int | None = None
) -> Iterator[torch.Tensor]:
    first = start_step * global_batch if start is None else start
    epoch, offset = divmod(first, num_samples)
    perm = _epoch_permutation(num_samples, seed, epoch)
    while True:
        parts = []
        need = global_batch
        while need:
            take = min(need, num_samples - offset)
            parts.append(perm[offset : offset + take])
            offset += take
            need -= take
            if offset == num_samples:
                epoch, offset = epoch + 1, 0
                perm = _epoch_permutation(num_samples, seed, epoch)
        # cat copies even a single part: a batch owns its memory rather than viewing the epoch.
        yield torch.cat(parts)


def take_samples(num_samples: int, seed: int, start: int, n: int) -> torch.Tensor:
    """Items ``start`` to ``start + n`` of the epochs laid end to end (see :func:`global_batches`).

    For a global batch that changes from step to step (``--accum-schedule``): step s takes the
    ``n_s`` items after those its predecessors took. With a constant global batch g this is
    exactly ``global_batches``' step ``start // g``.
    """
    check_int("num_samples", num_samples, minimum=1)
    check_int("start", start, minimum=0)
    check_int("n", n, minimum=1)
    return next(_global_batches(num_samples, n, seed, 0, start=start))


def eval_batches(num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``0..num_samples-1`` in order, in batches of ``batch_size`` (the last may be shorter).

    Args:
        num_samples: size of the dataset (0 yields nothing).
        batch_size: samples per batch.

    Returns:
        A finite iterator of 1-D ``LongTensor``.

    Raises:
        ValueError: ``num_samples`` is negative or ``batch_size`` is not positive.
    """
    check_int("num_samples", num_samples, minimum=0)
    check_int("batch_size", batch_size, minimum=1)
    return (
        torch.arange(start, min(start + batch_size, num_samples))
        for start in range(0, num_samples, batch_size)
    )


