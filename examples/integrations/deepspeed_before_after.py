"""DeepSpeed, before and after: ``python examples/integrations/deepspeed_before_after.py``
(one process; it runs under ``torchrun`` too, on CPU with gloo).

The change to a DeepSpeed loop (ZeRO stage 0, fp32)::

    +import bigbatch
    +from bigbatch.integrations.deepspeed import ExactEngine
     engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                       config=config)
    +exact = ExactEngine(engine)
     for epoch in range(epochs):
         for i, batch in enumerate(loader):
             logits = engine(input_ids=batch["input_ids"]).logits
    -        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    -        engine.backward(loss)
    +        loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
    +        exact.backward(loss, last=i == len(loader) - 1)
             engine.step()

DeepSpeed alone divides each micro-batch's mean loss by ``gradient_accumulation_steps``, and its
boundary counter runs across epochs: the short cycle at the end of an epoch is finished with the
next epoch's first micro-batches. The run is in float32 (DeepSpeed all-reduces fp32 gradients in
float32), so "after" is float32 rounding away from the float64 full-batch run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def train(exact_accumulation: bool):
    import deepspeed

    import bigbatch
    from bigbatch.integrations.deepspeed import ExactEngine, deepspeed_batch_config

    model = common.gpt2().float()
    optimizer = torch.optim.SGD(model.parameters(), lr=common.LR, momentum=common.MOMENTUM)
    steps = common.steps_per_epoch() * common.EPOCHS
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, common.linear(steps))
    plan = bigbatch.BatchPlan(micro_batch=common.MICRO, accum_steps=common.K, world_size=1)
    config = {**deepspeed_batch_config(plan), "gradient_clipping": common.CLIP,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=config)
    exact = ExactEngine(engine)
    loader = torch.utils.data.DataLoader(common.dataset(), batch_size=common.MICRO,
                                         collate_fn=common.collate)
    for _ in range(common.EPOCHS):
        for i, batch in enumerate(loader):
            logits = engine(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
            if exact_accumulation:
                loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
                exact.backward(loss, last=i == len(loader) - 1)
            else:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1),
                                       batch["labels"][:, 1:].flatten())
                engine.backward(loss)
            engine.step()
    return model


if __name__ == "__main__":
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(key, value)  # one process without a launcher
    deepspeed.init_distributed(dist_backend="gloo")
    common.report("DeepSpeed", train(False), train(True), dtype="float32")
