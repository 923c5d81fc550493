"""Lightning runs: ``python lightning_worker.py CASE[,CASE] OUT_DIR`` (alone or under torchrun).

A ``LightningModule`` as the Lightning docs write one, trained with ``accumulate_grad_batches``,
``gradient_clip_val`` and a per-step scheduler: CASE ``default`` returns the micro-batch's mean
loss, CASE ``exact`` returns ``exact_loss(self, LossSum)`` with the ``ExactAccumulation``
callback. Rank r writes ``OUT_DIR/CASE-rank<r>.pt``.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import trainer_data as td


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning(\.|$)")


def module(case: str, net: torch.nn.Module, steps: int) -> Any:
    import lightning as L

    import bigbatch
    from bigbatch.integrations.lightning import exact_loss

    class LitLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
            logits = td.logits_of(self.net, batch)
            if case == "exact":
                return exact_loss(self, bigbatch.token_cross_entropy(logits[:, :-1],
                                                                     batch["labels"][:, 1:]))
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, td.VOCAB), batch["labels"][:, 1:].reshape(-1))
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            opt = td.sgd(self.net)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, td.linear(steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LitLM()


def train(case: str, out: Path, net: torch.nn.Module | None = None, epochs: int = td.EPOCHS,
          precision: str = "64-true", devices: int = 1, ckpt: Path | None = None,
          save_every_epoch: bool = False) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from bigbatch.integrations.lightning import ExactAccumulation

    quiet()
    net = td.gpt2() if net is None else net
    steps = len(td.cycles(devices, td.EPOCHS))
    norms: list[float] = []

    class GradNorm(L.Callback):  # after ExactAccumulation: the norm Lightning's clipping sees
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))

    callbacks: list[Any] = [ExactAccumulation()] if case == "exact" else []
    callbacks.append(GradNorm())
    if save_every_epoch:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1,
                                         save_on_train_epoch_end=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision=precision, accumulate_grad_batches=td.K, gradient_clip_val=td.CLIP,
        gradient_clip_algorithm="norm", max_epochs=epochs, logger=CSVLogger(out, name="logs"),
        log_every_n_steps=1, enable_checkpointing=save_every_epoch, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        use_distributed_sampler=False)
    collator = Counting()
    # rows in order, rank r taking every other row (Lightning's own sampler would shuffle)
    sampler = None if devices == 1 else torch.utils.data.DistributedSampler(
        td.rows(), num_replicas=devices, rank=int(os.environ["RANK"]), shuffle=False)
    loader = torch.utils.data.DataLoader(td.rows(), batch_size=td.MICRO, collate_fn=collator,
                                         sampler=sampler)
    trainer.fit(module(case, net, steps), train_dataloaders=loader,
                ckpt_path=None if ckpt is None else str(ckpt))
    return {"params": [p.detach().clone() for p in net.parameters()],
            "losses": logged_losses(Path(trainer.logger.log_dir)), "grad_norms": norms,
            "tokens": collator.tokens, "global_step": trainer.global_step}


class Counting:
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = td.collate(batch)
        self.tokens.append(int((out["labels"][:, 1:] != -100).sum()))
        return out


def logged_losses(log_dir: Path) -> list[tuple[int, float]]:
    """(step, train_loss) rows of the CSV logger's metrics file."""
    path = log_dir / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(f)
                if r.get("train_loss")]


def main() -> None:
    import torch.distributed as dist

    cases, out = sys.argv[1], Path(sys.argv[2])
    for case in cases.split(","):
        result = train(case, out / case, devices=2)
        torch.save(result, out / f"{case}-rank{dist.get_rank()}.pt")



if __name__ == "__main__":
    main()
    td.close_group()
