"""Lightning, before and after: ``python examples/integrations/lightning_before_after.py``.

The change to a ``LightningModule`` trained with ``accumulate_grad_batches``::

    +import bigbatch
    +from bigbatch.integrations.lightning import ExactAccumulation, exact_loss
     ...
         def training_step(self, batch, batch_idx):
             logits = self.net(input_ids=batch["input_ids"]).logits
    -        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    -        self.log("train_loss", loss)
    -        return loss
    +        loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
    +        return exact_loss(self, loss)
     ...
    -trainer = L.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0)
    +trainer = L.Trainer(accumulate_grad_batches=4, gradient_clip_val=1.0,
    +                    callbacks=[ExactAccumulation()])  # logs train_loss once per step

Lightning alone divides each micro-batch's mean loss by ``accumulate_grad_batches``: a micro-batch
with 1 real token weighs as much as one with 30, and the short cycle at the end of each epoch is
still divided by the full K.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def train(exact: bool):
    import lightning as L

    import bigbatch
    from bigbatch.integrations.lightning import ExactAccumulation, exact_loss

    class LitLM(L.LightningModule):
        def __init__(self, net: torch.nn.Module, total_steps: int) -> None:
            super().__init__()
            self.net, self.total_steps = net, total_steps

        def training_step(self, batch, batch_idx):
            logits = self.net(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).logits
            if exact:
                loss = bigbatch.token_cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
                return exact_loss(self, loss)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=common.LR, momentum=common.MOMENTUM)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, common.linear(self.total_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    model = common.gpt2()
    loader = torch.utils.data.DataLoader(common.dataset(), batch_size=common.MICRO,
                                         collate_fn=common.collate)
    trainer = L.Trainer(
        accelerator="cpu", precision="64-true", max_epochs=common.EPOCHS,
        accumulate_grad_batches=common.K, gradient_clip_val=common.CLIP, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ExactAccumulation()] if exact else [])
    trainer.fit(LitLM(model, common.steps_per_epoch() * common.EPOCHS), loader)
    return model


if __name__ == "__main__":
    common.report("Lightning", train(False), train(True))
