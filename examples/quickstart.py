"""Train a small causal transformer with exact gradient accumulation and show the equivalence.

Run: ``python examples/quickstart.py``. Three copies of one model train on the same padded,
variable-length token batches (global batch 32) for a few steps, in float64:

1. full batch: one forward/backward over all 32 rows per step (the truth);
2. bigbatch: 8 micro-batches of 4 rows per step through ``Accumulator`` (exact);
3. naive: the pre-2024 recipe, each micro-batch's own token mean divided by K.

It prints the largest relative parameter difference of 2 and 3 from 1.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import bigbatch
from bigbatch.app.models.gpt import GPT, GPTConfig

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
STEPS, VOCAB, SEQ = 5, 256, 32
plan = bigbatch.BatchPlan(global_batch=32, micro_batch=4)


def make_batch(n: int) -> dict[str, torch.Tensor]:
    """Random byte sequences with random amounts of padding (label -100)."""
    ids = torch.randint(0, VOCAB, (n, SEQ))
    labels = torch.roll(ids, -1, dims=1)
    for row, length in enumerate(torch.randint(1, SEQ + 1, (n,)).tolist()):
        labels[row, length:] = -100
    return {"input_ids": ids, "labels": labels}


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> bigbatch.LossSum:
    return bigbatch.token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3)


base = GPT(GPTConfig(seq_len=SEQ, n_layer=2, n_head=2, d_model=32))
batches = [make_batch(plan.global_batch) for _ in range(STEPS)]
full, exact, naive = (copy.deepcopy(base) for _ in range(3))
opt_full, opt_naive = make_optimizer(full), make_optimizer(naive)
acc = bigbatch.Accumulator(exact, make_optimizer(exact), clip_grad_norm=1.0)

for step, batch in enumerate(batches, 1):
    opt_full.zero_grad()
    mean_loss(full, batch).backward()
    torch.nn.utils.clip_grad_norm_(full.parameters(), 1.0)
    opt_full.step()

    stats = acc.step(plan.split(batch), loss_fn)

    opt_naive.zero_grad()
    micro = plan.split(batch)
    for mb in micro:
        (mean_loss(naive, mb) / len(micro)).backward()
    torch.nn.utils.clip_grad_norm_(naive.parameters(), 1.0)
    opt_naive.step()
    print(f"step {step}: loss {stats.loss:.4f} over {stats.count} tokens in "
          f"{stats.micro_batches} micro-batches, grad norm {stats.grad_norm:.3f}")


def distance(a: torch.nn.Module, b: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([(p - q).flatten() for p, q in zip(a.parameters(), b.parameters())]).norm()


def rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """‖θ_a − θ_b‖ / ‖θ_b − θ_0‖: the distance from the truth relative to how far training moved."""
    return float(distance(a, b) / distance(b, base))


print(f"\nafter {STEPS} steps, distance from the full-batch weights / distance trained:")
print(f"  bigbatch (K={plan.accum_steps}, sum/count): {rel_diff(exact, full):.2e}")
print(f"  naive (mean of micro-batch means / K): {rel_diff(naive, full):.2e}")
