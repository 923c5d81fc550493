"""Accelerate runs: ``python accelerate_worker.py CASE[,CASE] OUT_DIR`` (alone or under torchrun).

The loop is the one the Accelerate docs show for gradient accumulation — ``accumulate()``,
``backward``, ``clip_grad_norm_`` when ``sync_gradients``, ``optimizer.step()``,
``scheduler.step()``, ``zero_grad()`` — with CASE ``default`` as written there (the mean loss of
each micro-batch) and CASE ``exact`` with the documented change (a ``LossSum`` through
``ExactAccumulation.backward``). Rank r writes ``OUT_DIR/CASE-rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import trainer_data as td


def train(case: str, model: torch.nn.Module | None = None, epochs: int = td.EPOCHS,
          mixed_precision: str = "no", save: Path | None = None, load: Path | None = None,
          first_epoch: int = 0) -> dict[str, Any]:
    """Train ``epochs`` epochs (from ``first_epoch``, after ``load_state(load)`` if given;
    ``save_state(save)`` at the end if given)."""
    from accelerate import Accelerator

    import bigbatch
    from bigbatch.integrations.accelerate import ExactAccumulation

    accelerator = Accelerator(gradient_accumulation_steps=td.K, cpu=True,
                              mixed_precision=mixed_precision)
    model = td.gpt2() if model is None else model
    optimizer = td.sgd(model)
    loader = torch.utils.data.DataLoader(td.rows(), batch_size=td.MICRO, collate_fn=td.collate)
    steps = len(td.cycles(accelerator.num_processes, td.EPOCHS))
    # Accelerate steps a prepared scheduler once per process per optimizer step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, td.linear(steps * accelerator.num_processes))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    exact = ExactAccumulation(accelerator, model)
    accelerator.register_for_checkpointing(exact)
    if load is not None:
        accelerator.load_state(str(load))
    losses, norms, tokens = [], [], []
    for _ in range(first_epoch, epochs):
        for batch in loader:
            tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                if case == "exact":
                    loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
                    exact.backward(loss)
                else:
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, td.VOCAB), batch["labels"][:, 1:].reshape(-1))
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norms.append(float(accelerator.clip_grad_norm_(model.parameters(), td.CLIP)))
                    losses.append(exact.loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    if save is not None:
        accelerator.save_state(str(save))
    inner = accelerator.unwrap_model(model)
    return {"params": [p.detach().clone() for p in inner.parameters()], "losses": losses,
            "grad_norms": norms, "tokens": tokens}


def main() -> None:
    import torch.distributed as dist

    cases, out = sys.argv[1], Path(sys.argv[2])
    for case in cases.split(","):
        result = train(case)
        torch.save(result, out / f"{case}-rank{dist.get_rank()}.pt")



if __name__ == "__main__":
    main()
    td.close_group()
