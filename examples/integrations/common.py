"""What the four before/after examples share: padded data, a tiny GPT-2, the full-batch truth.

Data: 30 rows of random token ids, each with 1 to 16 real tokens and padding after them
(``attention_mask`` 0, label -100), read in order in micro-batches of 2 rows, 4 micro-batches per
optimizer step: 15 micro-batches an epoch, so each epoch ends with a short cycle of 3. Training:
SGD with momentum, gradient clipping at 1.0, a linear learning-rate decay, 2 epochs, float64 (so
that what differs is the accumulation, not rounding). The truth: the same model trained with one
forward/backward per optimizer step over all that step's rows at once, plain PyTorch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

VOCAB, SEQ, ROWS, MICRO, K, EPOCHS = 64, 16, 30, 2, 4, 2
LR, MOMENTUM, CLIP = 0.1, 0.9, 1.0


def dataset() -> list[dict[str, torch.Tensor]]:
    """Rows of ``input_ids``, ``attention_mask`` and ``labels`` (input ids, -100 on padding)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(ROWS):
        n = int(torch.randint(1, SEQ + 1, (), generator=g))
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        mask = (torch.arange(SEQ) < n).long()
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": torch.where(mask.bool(), ids, -100)})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}


def gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 of width 32 (random weights, the same on every call), float64."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).double()


def steps_per_epoch(world: int = 1) -> int:
    micro_batches = -(-ROWS // MICRO) // world
    return -(-micro_batches // K)


def linear(total: int):
    """Linear decay to 0 over ``total`` optimizer steps (the HF Trainer's "linear")."""
    return lambda step: max(0.0, (total - step) / total)


def full_batch(model: torch.nn.Module, world: int = 1) -> torch.nn.Module:
    """The truth: a copy of ``model`` trained one full batch per optimizer step."""
    model = copy.deepcopy(model)
    rows = dataset()
    per_step = MICRO * K * world
    cycles = [rows[s:s + per_step] for s in range(0, ROWS, per_step)] * EPOCHS
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear(len(cycles)))
    for cycle in cycles:
        batch = collate(cycle)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
    return model


def distance(got: torch.nn.Module, want: torch.nn.Module, start: torch.nn.Module) -> float:
    """‖θ − θ_full‖ / ‖θ_full − θ_0‖: 0 is full-batch training; 1 is as far off as its update."""
    def flat(m: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double() for p in m.parameters()])

    return float((flat(got) - flat(want)).norm() / (flat(want) - flat(start)).norm())


def report(name: str, before: torch.nn.Module, after: torch.nn.Module, world: int = 1,
           dtype: str = "float64") -> None:
    start = gpt2()
    want = full_batch(start, world)
    print(f"{name}: distance from full-batch training (float64), relative to its update; "
          f"trained in {dtype}")
    print(f"  before (as documented):     {distance(before, want, start):.1e}")
    print(f"  after (the bigbatch change): {distance(after, want, start):.1e}")
