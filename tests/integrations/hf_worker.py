"""HF Trainer runs: ``python hf_worker.py CASE[,CASE] OUT_DIR`` (alone or under torchrun).

CASE ``exact`` trains with ``ExactTrainer``, ``default`` with the plain ``Trainer`` (the model
computes its loss from ``labels`` with the Trainer's ``num_items_in_batch``). Settings as in the
tests: SGD with momentum, ``max_grad_norm``, a linear schedule, micro-batches of ``MICRO`` rows,
``K`` per step, 2 epochs, rows in order. Rank r writes ``OUT_DIR/CASE-rank<r>.pt``: the
parameters, the logged losses and gradient norms, and the tokens this rank saw.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import trainer_data as td


def arguments(out: Path, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=td.MICRO,
        gradient_accumulation_steps=td.K, num_train_epochs=td.EPOCHS, learning_rate=td.LR,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=td.CLIP, weight_decay=0.0,
        optim="sgd", optim_args=f"momentum={td.MOMENTUM}", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        train_sampling_strategy="sequential")
    settings.update(overrides)
    return TrainingArguments(**settings)


class Counting:
    """A collator that also counts the real predicted tokens this process trained on."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = td.collate(batch)
        self.tokens.append(int((out["labels"][:, 1:] != -100).sum()))
        return out


def train(case: str, out: Path, model: torch.nn.Module | None = None, resume: str | None = None,
          **overrides: Any) -> dict:
    from transformers import Trainer
    from transformers.utils import logging

    from bigbatch.integrations.transformers import ExactTrainer

    logging.set_verbosity_error()
    model = td.gpt2() if model is None else model
    collator = Counting()
    cls = ExactTrainer if case == "exact" else Trainer
    trainer = cls(model=model, args=arguments(out, **overrides), train_dataset=td.rows(),
                  data_collator=collator)
    trainer.train(resume_from_checkpoint=resume)
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    return {"params": [p.detach().clone() for p in model.parameters()],
            "losses": [h["loss"] for h in logs], "grad_norms": [h["grad_norm"] for h in logs],
            "tokens": collator.tokens, "global_step": trainer.state.global_step}


def main() -> None:
    import torch.distributed as dist

    cases, out = sys.argv[1], Path(sys.argv[2])
    for case in cases.split(","):
        torch.manual_seed(0)
        result = train(case, out / case)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(result, out / f"{case}-rank{rank}.pt")



if __name__ == "__main__":
    main()
    td.close_group()
