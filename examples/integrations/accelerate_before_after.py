"""Accelerate, before and after: ``python examples/integrations/accelerate_before_after.py``.

The change to the loop of Accelerate's gradient-accumulation guide::

    +import bigbatch
    +from bigbatch.integrations.accelerate import ExactAccumulation
     ...
     model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    +exact = ExactAccumulation(accelerator, model)
     for batch in loader:
         with accelerator.accumulate(model):
             logits = model(input_ids=batch["input_ids"]).logits
    -        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    -        accelerator.backward(loss)
    +        loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
    +        exact.backward(loss)
             if accelerator.sync_gradients:
                 accelerator.clip_grad_norm_(model.parameters(), 1.0)
             optimizer.step()
             scheduler.step()
             optimizer.zero_grad()

Accelerate alone divides each micro-batch's mean loss by K: a micro-batch with 1 real token
weighs as much as one with 30, and the short cycle at the end of each epoch is still divided by
the full K. ``exact.loss`` is the exact mean loss of the last optimizer step (log it when
``accelerator.sync_gradients``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def train(exact_accumulation: bool):
    from accelerate import Accelerator

    import bigbatch
    from bigbatch.integrations.accelerate import ExactAccumulation

    accelerator = Accelerator(gradient_accumulation_steps=common.K, cpu=True)
    model = common.gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM)
    steps = common.steps_per_epoch() * common.EPOCHS
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.linear(steps))
    loader = torch.utils.data.DataLoader(common.dataset(), batch_size=common.MICRO,
                                         collate_fn=common.collate)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    exact = ExactAccumulation(accelerator, model)
    for _ in range(common.EPOCHS):
        for batch in loader:
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
                if exact_accumulation:
                    loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
                    exact.backward(loss)
                else:
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                           batch["labels"][:, 1:].flatten())
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), common.CLIP)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    if exact_accumulation:
        print(f"after: last step's exact mean loss {exact.loss:.4f} over {exact.count} tokens")
    return accelerator.unwrap_model(model)


if __name__ == "__main__":
    common.report("Accelerate", train(False), train(True))
