"""HF Trainer, before and after: ``python examples/integrations/transformers_before_after.py``.

The change to a script that trains with ``transformers.Trainer``::

    -from transformers import Trainer, TrainingArguments
    +from transformers import TrainingArguments
    +from bigbatch.integrations.transformers import ExactTrainer
     ...
    -trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    +trainer = ExactTrainer(model=model, args=args, train_dataset=rows, data_collator=collate)

Both train a GPT-2 (labels = input ids, -100 on padding) with gradient accumulation, clipping
and a linear schedule; the script prints how far each ends from full-batch training. The Trainer
alone counts the *unshifted* labels for GPT-2 (whose ``loss_type`` is unset): one item per row
too many, a different error every step.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def train(exact: bool, out: str):
    from transformers import Trainer, TrainingArguments

    from bigbatch.integrations.transformers import ExactTrainer

    model = common.gpt2()
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=common.MICRO,
        gradient_accumulation_steps=common.K, num_train_epochs=common.EPOCHS,
        learning_rate=common.LR, optim="sgd", optim_args=f"momentum={common.MOMENTUM}",
        lr_scheduler_type="linear", max_grad_norm=common.CLIP, logging_steps=1,
        train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True)
    trainer = (ExactTrainer if exact else Trainer)(
        model=model, args=args, train_dataset=common.dataset(), data_collator=common.collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{'after' if exact else 'before'}: logged losses {[round(x, 4) for x in losses[:4]]} …")
    return model


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as out:
        common.report("HF Trainer", train(False, out), train(True, out))
