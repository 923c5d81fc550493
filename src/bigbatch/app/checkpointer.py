"""Saving and resuming a run: what goes into a checkpoint, and where it is put back.

A :class:`Checkpointer` knows the run's stateful objects — model, optimizer, scheduler, the
engine, and named extras such as the noise-scale average and the K schedule — and writes them
with the random states, the data position and the length of ``metrics.jsonl`` as one atomic,
verified checkpoint (:mod:`.checkpoint`, :mod:`.runstate`). Under torchrun every rank takes part
(FSDP2 gathers its shards) and rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ..engine import Accumulator
from .checkpoint import CheckpointError, load_latest, save_checkpoint, set_aside
from .launch import Ranks
from .runfolder import rewind_metrics
from .runstate import Position, capture, checkpoint_name, rank_state, restore, unusable

__all__ = ["Checkpointer", "Stateful"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Writes and reads the checkpoints of one run folder.

    Args:
        out: the run folder (checkpoints go to ``out/checkpoints``).
        ranks, comm: the data-parallel ranks and the device their small collectives use.
        model, optimizer, scheduler, acc: what is trained (``model`` unwrapped).
        trainable_only: save only the parameters that train (LoRA adapters), not the frozen base.
        extras: further state by name (None values are saved as None and not restored).
        keep: how many checkpoints to keep.
        fsdp: the model is sharded with FSDP2.
    """

    def __init__(self, out: Path, *, ranks: Ranks, comm: torch.device, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, acc: Accumulator,
                 extras: Mapping[str, Stateful | None], keep: int, fsdp: bool,
                 trainable_only: bool = False) -> None:
        self.out, self.root, self.metrics = out, out / "checkpoints", out / "metrics.jsonl"
        self.ranks, self.comm, self.keep, self.fsdp = ranks, comm, keep, fsdp
        self.model, self.optimizer, self.scheduler, self.acc = model, optimizer, scheduler, acc
        self.extras = dict(extras)
        self.trainable_only = trainable_only  # LoRA: the frozen base comes from its folder
        self.boundary: str | None = None  # the newest checkpoint between steps: never pruned

    def save(self, step: int, micro: int) -> Path:
        """Checkpoint the run at optimizer step ``step``, ``micro`` micro-batches into the next
        cycle (all ranks call it; rank 0 writes). Returns the checkpoint's path."""
        where = Position(step, micro, self.metrics.stat().st_size if self.ranks.main else 0)
        state = capture(where, self.model, self.optimizer, self.scheduler, self.acc,
                        fsdp=self.fsdp, trainable_only=self.trainable_only)
        state["extra"] = {name: None if obj is None else obj.state_dict()
                          for name, obj in self.extras.items()}
        if self.ranks.world_size > 1:  # each rank's own part, gathered into the one checkpoint
            state["ranks"] = self.ranks.gather(rank_state(self.acc, micro > 0))
        name = checkpoint_name(step, micro)
        if micro == 0:
            self.boundary = name
        self.ranks.together("writing a checkpoint", self.comm, lambda: self.ranks.main and
                            save_checkpoint(self.root, name, state, keep=self.keep,
                                            protect=self.boundary))
        return self.root / name

    def exists(self, step: int, micro: int) -> bool:
        return (self.root / checkpoint_name(step, micro)).exists()

    def resume(self) -> tuple[Position, list[str]]:
        """Load the newest checkpoint that verifies into the run's objects (none yet: the run
        starts from step 0, as built); rewind ``metrics.jsonl`` to it. Returns the position and
        notes for the log.

        Raises:
            CheckpointError: checkpoints exist but none verifies, or the newest good one does not
                fit this run.
        """
        notes: list[str] = []

        skipped: list[tuple[Path, str]] = []
        world = self.ranks.world_size

        def load() -> Position:
            found = load_latest(self.root, lambda state: unusable(state, world), skipped)
            if found is None and skipped:  # starting over would discard (and collide with) them
                path, why = skipped[0]
                raise CheckpointError(
                    f"no checkpoint in {self.root} fits this run: the newest ({path.name}) was "
                    f"{why}, and there is none at a step boundary; resume with the number of "
                    "ranks they were taken with, or start a new run in another --out")
            if found is None:  # stopped before its first checkpoint: the run starts over
                notes.append(f"no checkpoint yet in {self.out}: starting the run from step 0 "
                             "with its recorded configuration and seed")
                return Position(0, 0, 0)
            path, state, rejected = found
            try:
                where = restore(state, self.model, self.optimizer, self.scheduler, self.acc,
                                fsdp=self.fsdp, trainable_only=self.trainable_only,
                                rank=self.ranks.rank, world_size=world)
                extra = state.get("extra") or {}
                for name, obj in self.extras.items():
                    if obj is not None:
                        obj.load_state_dict(extra[name])
            except KeyError as err:
                raise CheckpointError(f"--resume {self.out}: {path.name} lacks {err} (written by "
                                      "another bigbatch version?)") from None
            except CheckpointError as err:
                raise CheckpointError(f"--resume {self.out}: {path.name}: {err}") from None
            if self.ranks.main:
                for bad, why in rejected:  # the run will write these names again: set aside
                    notes.append(f"checkpoint {bad.name} is unusable ({why}); moved to "
                                 f"{set_aside(bad).name}, falling back")
            if skipped:
                notes.append(f"{skipped[0][0].name} was {skipped[0][1]}; resuming from the "
                             "newest checkpoint between steps instead "
                             f"({len(skipped)} passed over)")
            notes.append(f"resuming from {path.name}: step {where.step}, micro-batch "
                         f"{where.micro}")
            if where.micro == 0:
                self.boundary = path.name
            return where

        position = self.ranks.together("loading the checkpoint", self.comm, load)
        if self.ranks.main:
            notes += rewind_metrics(self.metrics, position.metrics_bytes)
        return position, notes
