"""DeepSpeed runs on CPU: ``torchrun ... deepspeed_worker.py CASE[,CASE] OUT_DIR``.

A plain DeepSpeed loop — ``loss = ...; engine.backward(loss); engine.step()`` per micro-batch,
``gradient_clipping``, a client SGD optimizer and per-step linear schedule handed to
``deepspeed.initialize``, ZeRO stage 0 — with CASE ``default`` as DeepSpeed users write it (the
micro-batch's mean loss) and CASE ``exact`` with ``ExactEngine.backward(LossSum, last=...)``
(``exact-noclip``: the same without ``gradient_clipping``). At each boundary it records the
weights and the gradient DeepSpeed is about to clip and step on.
Rank r reads every W-th row. Rank r writes ``OUT_DIR/CASE-rank<r>.pt``.

DeepSpeed all-reduces fp32 gradients in float32 (``communication_data_type``, whose config key
takes fp32/fp16/bf16 only) and its CPU accelerator lists float32/bf16/fp16 as the dtypes it
reduces. For the float64 check the worker sets ``engine.communication_data_type`` to float64 (the
engine's public setter) and adds float64 to that list: the same gloo all-reduce then carries
float64; nothing else of DeepSpeed changes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
import trainer_data as td


def allow_float64_reduction() -> None:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    dtypes = acc.supported_dtypes()
    acc.supported_dtypes = lambda: [*dtypes, torch.float64]


def train(case: str) -> dict[str, Any]:
    """CASE ``exact``, ``exact-noclip`` (``gradient_clipping`` 0) or ``default``."""
    import deepspeed
    import torch.distributed as dist

    import bigbatch
    from bigbatch.integrations.deepspeed import ExactEngine

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    world, rank = dist.get_world_size(), dist.get_rank()
    model = td.gpt2()
    optimizer = td.sgd(model)
    steps = len(td.cycles(world, td.EPOCHS))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, td.linear(steps))
    config = {"train_micro_batch_size_per_gpu": td.MICRO, "gradient_accumulation_steps": td.K,
              "gradient_clipping": 0.0 if case.endswith("noclip") else td.CLIP,
              "zero_optimization": {"stage": 0},
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=config)
    engine.communication_data_type = torch.float64  # DeepSpeed's default for fp32 is float32
    exact = ExactEngine(engine) if case.startswith("exact") else None
    sampler = torch.utils.data.DistributedSampler(td.rows(), num_replicas=world, rank=rank,
                                                  shuffle=False)
    loader = torch.utils.data.DataLoader(td.rows(), batch_size=td.MICRO, collate_fn=td.collate,
                                         sampler=sampler)
    losses, norms, tokens, before, grads = [], [], [], [], []
    for _ in range(td.EPOCHS):
        for i, batch in enumerate(loader):
            tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
            logits = td.logits_of(engine, batch)
            if exact is not None:
                exact.backward(bigbatch.token_cross_entropy(logits[:, :-1],
                                                            batch["labels"][:, 1:]),
                               last=i == len(loader) - 1)
            else:
                engine.backward(torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, td.VOCAB), batch["labels"][:, 1:].reshape(-1)))
            if engine.is_gradient_accumulation_boundary():  # what DeepSpeed clips and steps on
                params = list(engine.module.parameters())
                before.append([p.detach().clone() for p in params])
                grads.append([p.grad.detach().clone() for p in params])
                norms.append(float(torch.linalg.vector_norm(torch.cat(
                    [g.reshape(-1) for g in grads[-1]]))))
                if exact is not None:
                    losses.append(exact.loss)
            engine.step()
    return {"params": [p.detach().clone() for p in engine.module.parameters()],
            "losses": losses, "grad_norms": norms, "tokens": tokens, "before": before,
            "grads": grads, "global_step": engine.global_steps}


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    cases, out = sys.argv[1], Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    allow_float64_reduction()
    for case in cases.split(","):
        result = train(case)
        torch.save(result, out / f"{case}-rank{dist.get_rank()}.pt")



if __name__ == "__main__":
    main()
    td.close_group()
