"""Shared by the trainer-integration tests: padded variable-length data, a tiny GPT-2, and the
independent full-batch truth (plain PyTorch: no trainer, no bigbatch).

The data: ``ROWS`` rows of ``SEQ`` token ids, row i with ``length(i)`` real tokens and the rest
padding (``attention_mask`` 0, label -100). Micro-batches of ``MICRO`` rows, ``K`` per optimizer
step. Every trainer here reads the rows in order (no shuffling) and, on ``W`` ranks, gives each
rank every W-th micro-batch (Accelerate, HF Trainer) or every W-th row (Lightning's
``DistributedSampler``): either way optimizer step s of an epoch covers rows
``[s·G, (s+1)·G)`` with ``G = MICRO · K · W``, and the epoch's last step the rows left
(``ROWS = 28``: 14 micro-batches, so K = 3 leaves a short last cycle of 2 micro-batches in one
process and of 1 per rank on 2).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB, SEQ, ROWS, MICRO, K = 64, 12, 28, 2, 3
LR, MOMENTUM, CLIP, EPOCHS = 0.2, 0.9, 1.5, 2
RTOL = 1e-10  # on the update: ‖θ − θ_full‖ / ‖θ_full − θ_0‖
HERE = Path(__file__).resolve().parent


def lengths() -> list[int]:
    """Real tokens per row: 1 to SEQ, very uneven between micro-batches and between ranks."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(ROWS):
        if (i // MICRO) % 4 == 0:  # every 4th micro-batch: 1 or 2 predicted tokens per row
            low, high = 2, 3
        else:  # even rows shorter: rank 0 holds fewer tokens when ranks split rows
            low, high = (2, 7) if i % 2 == 0 else (6, SEQ)
        out.append(int(torch.randint(low, high + 1, (), generator=g)))
    return out


def rows() -> list[dict[str, torch.Tensor]]:
    """The dataset: dicts of ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n in lengths():
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < n).long()
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100))})
    return out


def collate(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 of width 32, float64, dropout off, the same weights on every call."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).double()


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out["logits"] if isinstance(out, dict) else out.logits


def lm_mean(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the batch's real predicted tokens (the full-batch objective)."""
    logits = logits_of(model, batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def cycles(world: int = 1, epochs: int = EPOCHS) -> list[list[int]]:
    """Row indices of each optimizer step: consecutive chunks of MICRO·K·world rows per epoch."""
    g = MICRO * K * world
    one = [list(range(s, min(s + g, ROWS))) for s in range(0, ROWS, g)]
    return one * epochs


def linear(total: int) -> Callable[[int], float]:
    """Linear decay to 0 over ``total`` steps, no warm-up (as HF's ``linear`` schedule)."""
    return lambda s: max(0.0, (total - s) / total)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum: unlike Adam, it does not hide a wrong scale of the whole gradient."""
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def truth(model: torch.nn.Module, world: int = 1, epochs: int = EPOCHS,
          clip: float | None = CLIP) -> tuple[torch.nn.Module, list[float], list[float]]:
    """Full-batch training of a copy of ``model``: per step one forward and backward of the mean
    loss over all the step's rows, ``clip_grad_norm_``, SGD with momentum, the linear schedule.

    Returns the trained copy, each step's full-batch mean loss and gradient norm (before
    clipping).
    """
    model = copy.deepcopy(model)
    data, steps = rows(), cycles(world, epochs)
    opt = sgd(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear(len(steps)))
    losses, norms = [], []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        loss = lm_mean(model, collate([data[i] for i in step]))
        loss.backward()
        losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or math.inf)))
        opt.step()
        sched.step()
    return model, losses, norms


def flat(params: Sequence[torch.Tensor] | torch.nn.Module) -> torch.Tensor:
    ps = params.parameters() if isinstance(params, torch.nn.Module) else params
    return torch.cat([p.detach().reshape(-1).double() for p in ps])


def distance(got: Sequence[torch.Tensor] | torch.nn.Module, want: torch.nn.Module,
             start: torch.nn.Module) -> float:
    """‖θ − θ_full‖ / ‖θ_full − θ_0‖ over all parameters as one vector: 0 is the full batch,
    1 is as far from it as the full-batch update is long."""
    w = flat(want)
    return float(torch.linalg.vector_norm(flat(got) - w)
                 / torch.linalg.vector_norm(w - flat(start)))


def per_rank_tokens(world: int, by: str) -> list[int]:
    """Real predicted tokens each rank holds in epoch 1 (``by``: "batch" or "row" sharding)."""
    counts = [0] * world
    for i, n in enumerate(lengths()):
        r = (i // MICRO) % world if by == "batch" else i % world
        counts[r] += max(n - 1, 0)
    return counts


def torchrun(script: Path, case: str, out: Path, world: int = 2, timeout: float = 300,
             extra_env: dict[str, str] | None = None) -> None:
    """``torchrun --standalone --nproc-per-node world script case out``; fails on error or hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", str(script), case, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])


def tokens_per_micro_batch() -> list[int]:
    """Real predicted tokens in each micro-batch of an epoch, in order."""
    ls = lengths()
    return [sum(max(n - 1, 0) for n in ls[j:j + MICRO]) for j in range(0, ROWS, MICRO)]


assert math.ceil(ROWS / MICRO) % K != 0  # a short last cycle in one process



def close_group() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down at exit can
    abort a rank ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
