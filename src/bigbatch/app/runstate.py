"""Capture and restore a training run's whole state, mid-cycle included, and catch stop signals.

A checkpoint holds: model, optimizer, scheduler and accumulator state (the partial gradient, loss
sum and item count of a cycle in flight), every RNG (Python, NumPy when installed, torch, CUDA),
the data position (optimizer step and micro-batch within the cycle) and how many bytes of
``metrics.jsonl`` belong to it. The files themselves are written by :mod:`bigbatch.checkpoint`.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from ..engine import Accumulator
from .checkpoint import CheckpointError

__all__ = ["Position", "StopSignals", "capture", "checkpoint_name", "rank_state", "restore",
           "unusable"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``step`` optimizer steps finished, ``micro`` micro-batches of the next
    cycle accumulated, and the length of ``metrics.jsonl`` at that moment."""

    step: int
    micro: int
    metrics_bytes: int


def checkpoint_name(step: int, micro: int) -> str:
    """Names sort chronologically: ``step-00000012-micro-0003``."""
    return f"step-{step:08d}-micro-{micro:04d}"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                          int(has_gauss), float(gauss)]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def model_state(model: torch.nn.Module, *, fsdp: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict()``; under FSDP2 the full (unsharded) tensors, gathered on every rank
    (a collective: all ranks must call it)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     fsdp: bool) -> dict[str, Any]:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True))


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the parameters that train (LoRA: the adapters only)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def capture(position: Position, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, acc: Accumulator, *, fsdp: bool = False,
            trainable_only: bool = False) -> dict[str, Any]:
    """The state tree of a checkpoint (tensors are referenced, the writer copies them).

    With ``fsdp`` the model and optimizer states are gathered to full tensors: every rank must
    call it, and every rank gets the whole state.
    """
    return {
        "format": FORMAT_VERSION,
        "step": position.step,
        "micro": position.micro,
        "metrics_bytes": position.metrics_bytes,
        "model": _only(model_state(model, fsdp=fsdp), model, trainable_only),
        "optimizer": _optimizer_state(model, optimizer, fsdp),
        "scheduler": scheduler.state_dict(),
        "accumulator": acc.state_dict(),
        "rng": _rng_state(),
    }


def _only(weights: dict[str, torch.Tensor], model: torch.nn.Module,
          trainable_only: bool) -> dict[str, torch.Tensor]:
    if not trainable_only:
        return weights
    keep = trainable_names(model)
    return {k: v for k, v in weights.items() if k in keep}


def rank_state(acc: Accumulator, mid_cycle: bool) -> dict[str, Any]:
    """What only this rank knows: its random state and, mid-cycle, its own partial cycle."""
    return {"accumulator": acc.state_dict() if mid_cycle else None, "rng": _rng_state()}


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, acc: Accumulator, *, fsdp: bool = False,
            trainable_only: bool = False, rank: int = 0, world_size: int = 1) -> Position:
    """Load a checkpoint's state tree into freshly built objects; returns the data position.

    A checkpoint written by several ranks holds each one's random state (and, mid-cycle, its
    partial cycle) under ``"ranks"``: on the same world size each rank takes its own; on another,
    a checkpoint between cycles is restored with rank 0's random state (a mid-cycle one cannot
    be, see :func:`unusable`).

    Raises:
        CheckpointError: the state is of another format version or does not fit these objects
            (another model shape, optimizer or accumulation plan).
    """
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"run state format {got!r} is not {FORMAT_VERSION}; resume it with "
                              "the bigbatch version that wrote it")
    try:
        if fsdp:  # full tensors in the file; each rank keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=_full(state["model"], model,
                                                                    trainable_only),
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(_full(state["model"], model, trainable_only))
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        own = state.get("ranks")
        mine = own[rank] if own and len(own) == world_size else None
        acc_state = mine["accumulator"] if mine and mine["accumulator"] else state["accumulator"]
        acc.load_state_dict(acc_state)
        _set_rng_state(mine["rng"] if mine else state["rng"])
        return Position(int(state["step"]), int(state["micro"]), int(state["metrics_bytes"]))
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:
        what = " ".join(str(err).split())[:300]
        raise CheckpointError(f"the checkpoint does not fit this run ({type(err).__name__}: "
                              f"{what}); was config.yaml edited after it was written?") from None


def _full(saved: dict[str, torch.Tensor], model: torch.nn.Module,
          trainable_only: bool) -> dict[str, torch.Tensor]:
    """The state to load: with ``trainable_only`` the saved (trainable) tensors over the model's
    own frozen ones, after checking the checkpoint holds exactly the trainable ones."""
    if not trainable_only:
        return saved
    want = trainable_names(model)
    if set(saved) != want:
        raise ValueError(f"the checkpoint holds {len(saved)} trained tensors, this model trains "
                         f"{len(want)} (another --lora rank or targets?)")
    return {**model.state_dict(), **saved}


def unusable(state: Any, world_size: int) -> str | None:
    """Why a run on ``world_size`` ranks cannot resume from this state (None: it can). A
    checkpoint taken in the middle of a cycle holds each rank's partial gradient: only the same
    number of ranks can continue it."""
    if not isinstance(state, dict) or not int(state.get("micro", 0) or 0):
        return None
    written = len(state.get("ranks") or []) or 1
    if written != world_size:
        return (f"taken mid-cycle by {written} rank(s), and this run has {world_size}: only as "
                "many can continue a cycle")
    return None


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current micro-batch (with a
    checkpoint).

    Schedulers often signal every process of a job at once (torchrun and its workers, SLURM's
    ``scancel --signal``), so a worker may get the same request twice: a second signal within
    ``GRACE`` seconds of the first is that same request and is ignored, so the checkpoint being
    written is not cut short. A second one later, or a third, stops at once (the previous
    handler is put back and the signal raised again). Outside the main thread, where handlers
    cannot be installed, this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    GRACE = 10.0

    def __init__(self) -> None:
        self.received: int | None = None
        self._first = 0.0
        self._count = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        self._count += 1
        if self.received is None:
            self.received, self._first = signum, now
            return
        if self._count == 2 and now - self._first < self.GRACE:
            return  # the same stop request, delivered twice
        self.__exit__()
        signal.raise_signal(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
