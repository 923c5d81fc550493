"""An independent full-batch reference for runs of the ``bigbatch train`` command.

The run's setup is taken from the command's own building blocks — the same model initialization
(``build_workload``), the same global batches in the same order (``global_batches``), the same
AdamW groups and learning-rate schedule — but each step is plain PyTorch on the whole global
batch: mean cross-entropy over its real tokens, one backward, ``clip_grad_norm_``, one optimizer
and scheduler step. No bigbatch engine code (Accumulator, BatchPlan, LossSum) is involved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigbatch.app.config import TrainConfig
from bigbatch.app.data import global_batches
from bigbatch.app.workload import build_workload, make_optimizer, make_scheduler


def full_batch_weights(naive_k: int | None = None, **flags: object,
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train as ``bigbatch train`` with these flat flags would, one full-batch step per global
    batch. Returns (final weights, initial weights) by parameter name, in float64 for comparing.

    ``naive_k``: the negative case instead — the loss is the mean of the means of ``naive_k``
    equal slices of the global batch (each over its own tokens), the pre-2024 recipe.
    """
    config = TrainConfig.of(**flags)  # type: ignore[arg-type]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as in the command: initialized in float32, then cast
    try:
        work = build_workload(config)
    finally:
        torch.set_default_dtype(old)
    model = work.model
    start = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, config)
    sched = make_scheduler(opt, config)
    order = global_batches(len(work.train), config.plan().global_batch, config.runtime.seed)
    for _ in range(config.optim.steps):
        batch = work.train.batch(next(order))
        slices = [{k: v.chunk(naive_k)[i] for k, v in batch.items()} for i in range(naive_k)
                  ] if naive_k else [batch]
        loss = sum(F.cross_entropy(model(b["input_ids"]).flatten(0, -2), b["labels"].flatten(),
                                   ignore_index=-100) for b in slices) / len(slices)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
        opt.step()
        sched.step()
    return {k: v.detach().double() for k, v in model.state_dict().items()}, start


def max_rel_diff_named(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """max over the tensors both hold of ‖got − want‖∞ / ‖want‖∞ (a run's saved weights may
    leave out tied copies); at least one tensor must be shared."""
    names = sorted(set(got) & set(want))
    assert names, (sorted(got), sorted(want))
    worst = 0.0
    for name in names:
        a, b = got[name].double(), want[name].double()
        scale = float(b.abs().max())
        diff = float((a - b).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
