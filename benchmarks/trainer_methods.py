"""The trainers of ``python -m benchmarks peers`` and their bigbatch integrations, as methods
that take one optimizer step per call (:class:`benchmarks.peer_methods.Method`).

* ``accelerate_bb``: Accelerate's documented loop with :class:`bigbatch.integrations.accelerate.
  ExactAccumulation`: a ``LossSum`` through ``exact.backward`` instead of the mean through
  ``accelerator.backward``; everything else as ``accelerate``.
* ``lightning`` / ``lightning_bb``: a ``LightningModule`` trained by ``Trainer(
  accumulate_grad_batches=K, gradient_clip_val=1.0, max_steps=S)``; ``training_step`` returns the
  mean loss, or ``exact_loss(self, LossSum)`` with the ``ExactAccumulation`` callback.
* ``hftrainer`` / ``hftrainer_bb``: ``transformers.Trainer(gradient_accumulation_steps=K,
  max_grad_norm=1.0, max_steps=S)`` with the benchmark's AdamW (``optimizers=``) and a constant
  schedule; the loss through the Trainer's own ``compute_loss_func`` (the summed token loss
  divided by the Trainer's ``num_items_in_batch``: on this data, whose labels are already aligned
  with the logits, that count is right and the Trainer alone is exact too), or
  :class:`bigbatch.integrations.transformers.ExactTrainer` with ``loss_fn`` = ``LossSum``.

Lightning and the HF Trainer run their own loop and cannot be paused between optimizer steps,
so each runs in a thread of its own, fed one cycle at a time (:class:`Threaded`): ``step(cycle)``
hands it the cycle's K micro-batches and returns when the trainer asks for the next cycle's first
micro-batch, that is, after the step and every hook, log and bookkeeping that follow it. Only one
thread runs at a time; the timing is the same for a trainer and its bigbatch twin.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.loss import IGNORE_INDEX

from .peer_methods import CLIP, AccelerateLoop, Batch, Cycle, Method, make_optimizer, mean_loss
from .peer_methods import sum_loss as _sum_loss

_STOP = object()


class AccelerateExact(AccelerateLoop):
    """Accelerate's loop with ``ExactAccumulation.backward(LossSum)`` for the backward."""

    name = "accelerate_bb"

    def __init__(self, model: nn.Module, k: int, device: torch.device) -> None:
        from bigbatch.integrations.accelerate import ExactAccumulation

        super().__init__(model, k, device)
        self.exact = ExactAccumulation(self.accelerator, self.prepared)

    def step(self, cycle: Cycle) -> None:
        acc = self.accelerator
        for batch in cycle:
            with acc.accumulate(self.prepared):
                self.exact.backward(_sum_loss(self.prepared, batch))
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.prepared.parameters(), CLIP)
                self.optimizer.step()
                self.optimizer.zero_grad()


class Fed:
    """The micro-batches a threaded trainer reads, handed over one cycle at a time.

    It has a length (``steps × k``), so Lightning does not read ahead to find the last batch.
    Reading the first micro-batch of a cycle first marks the trainer idle: everything it did for
    the previous cycle is done.
    """

    def __init__(self, steps: int, k: int) -> None:
        self.total, self.k = steps * k, k
        self.queue: queue.Queue[Any] = queue.Queue()
        self.idle = threading.Event()

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.total):
            if i % self.k == 0:
                self.idle.set()
            item = self.queue.get()
            if item is _STOP:
                return
            yield item


class Threaded(Method):
    """A trainer that runs its own loop, in a thread, one optimizer step per :meth:`step`.

    ``run(loader)`` trains on ``loader`` (a :class:`Fed`) for ``steps`` optimizer steps of ``k``
    micro-batches; the constructor returns once the trainer waits for its first micro-batch.
    """

    def __init__(self, model: nn.Module, steps: int, k: int,
                 run: Callable[[Fed], None]) -> None:
        super().__init__(model)
        self.fed = Fed(steps, k)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(run,), daemon=True)
        self.thread.start()
        self._wait()

    def _main(self, run: Callable[[Fed], None]) -> None:
        try:
            run(self.fed)
        except BaseException as err:  # re-raised in the caller's thread
            self.error = err
        finally:
            self.fed.idle.set()

    def _wait(self) -> None:
        self.fed.idle.wait()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed in its thread: {self.error!r}") from self.error

    def step(self, cycle: Cycle) -> None:
        self.fed.idle.clear()
        for batch in cycle:
            self.fed.queue.put(batch)
        self._wait()

    def close(self) -> None:
        """Wait for the trainer to finish (it stops after its last step)."""
        self.fed.queue.put(_STOP)
        self.thread.join(timeout=600)
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed in its thread: {self.error!r}") from self.error


# -- Lightning ---------------------------------------------------------------------------------

def quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning(\.|$)")


class LightningMethod(Threaded):
    """``Trainer(accumulate_grad_batches=k, gradient_clip_val=1.0, max_steps=steps).fit``."""

    def __init__(self, model: nn.Module, k: int, steps: int, device: torch.device,
                 exact: bool) -> None:
        self.name = "lightning_bb" if exact else "lightning"
        super().__init__(model, steps, k, lambda fed: self._fit(fed, k, steps, device, exact))

    def _fit(self, fed: Fed, k: int, steps: int, device: torch.device, exact: bool) -> None:
        import lightning as L

        from bigbatch.integrations.lightning import ExactAccumulation, exact_loss

        quiet_lightning()
        net = self.model

        class LitLM(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
                if exact:
                    return exact_loss(self, _sum_loss(self.net, batch))
                return mean_loss(self.net, batch)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return make_optimizer(self.net)

        double = next(net.parameters()).dtype == torch.float64
        trainer = L.Trainer(
            accelerator="cpu" if device.type == "cpu" else "gpu",
            devices=1 if device.type == "cpu" else [device.index or 0],
            precision="64-true" if double else "32-true", accumulate_grad_batches=k,
            gradient_clip_val=CLIP, gradient_clip_algorithm="norm", max_steps=steps,
            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[ExactAccumulation(log=None)] if exact else [])
        trainer.fit(LitLM(), train_dataloaders=fed)


# -- the Hugging Face Trainer ------------------------------------------------------------------

def _aligned_sum(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy: the benchmark's models return logits aligned with labels."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class _Plain(nn.Module):
    """The model as the Trainer sees it: its forward, its parameters, no ``config`` attribute
    (the Trainer writes into a model's config; the bigbatch GPT's is frozen)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids)


class HFTrainerMethod(Threaded):
    """``transformers.Trainer`` (or ``ExactTrainer``) trained on the fed micro-batches."""

    def __init__(self, model: nn.Module, k: int, steps: int, device: torch.device,
                 exact: bool, workdir: str) -> None:
        self.name = "hftrainer_bb" if exact else "hftrainer"
        super().__init__(model, steps, k,
                         lambda fed: self._train(fed, k, steps, device, exact, workdir))

    def _train(self, fed: Fed, k: int, steps: int, device: torch.device, exact: bool,
               workdir: str) -> None:
        from transformers import PrinterCallback, Trainer, TrainingArguments
        from transformers.utils import logging as hf_logging

        from bigbatch import token_cross_entropy
        from bigbatch.integrations.transformers import ExactTrainer

        hf_logging.set_verbosity_error()
        base = ExactTrainer if exact else Trainer
        fed_trainer = type(f"Fed{base.__name__}", (base,),
                           {"get_train_dataloader": lambda self: fed})
        args = TrainingArguments(
            output_dir=workdir, per_device_train_batch_size=1, gradient_accumulation_steps=k,
            max_steps=steps, max_grad_norm=CLIP, lr_scheduler_type="constant",
            logging_strategy="no", save_strategy="no", report_to=[],
            use_cpu=device.type == "cpu", disable_tqdm=True, seed=0)
        kwargs: dict[str, Any] = (
            {"loss_fn": lambda out, labels: token_cross_entropy(out, labels)} if exact else
            {"compute_loss_func": lambda out, labels, num_items_in_batch=None:
                _aligned_sum(out, labels) / num_items_in_batch})
        trainer = fed_trainer(model=_Plain(self.model), args=args,
                              optimizers=(make_optimizer(self.model), None), **kwargs)
        trainer.remove_callback(PrinterCallback)  # the tables own stdout
        trainer.train()


THREADED = ("lightning", "lightning_bb", "hftrainer", "hftrainer_bb")


def make_trainer_method(name: str, model: nn.Module, k: int, steps: int,
                        device: torch.device, workdir: str) -> Method:
    """A method of this module by name (see the module docstring)."""
    if name == "accelerate_bb":
        return AccelerateExact(model, k, device)
    if name in ("lightning", "lightning_bb"):
        return LightningMethod(model, k, steps, device, exact=name.endswith("_bb"))
    if name in ("hftrainer", "hftrainer_bb"):
        return HFTrainerMethod(model, k, steps, device, exact=name.endswith("_bb"),
                               workdir=workdir)
    raise ValueError(f"no trainer method {name!r}")
