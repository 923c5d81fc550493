"""Exact accumulation in the Hugging Face ``Trainer`` (transformers >= 5): :class:`ExactTrainer`.

The change to a script that trains with ``Trainer``::

    from bigbatch.integrations.transformers import ExactTrainer

    trainer = ExactTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()                                          # was: Trainer(...) — nothing else

What the Trainer does alone (5.x): it prefetches the cycle's micro-batches, counts their labels
that are not -100 (``num_items_in_batch``) and has the model divide its summed loss by that
count. For a causal LM whose ``loss_type`` is unset — ``GPT2LMHeadModel`` among them — it counts
the *unshifted* labels, one more per row than the loss sums over, so every step is scaled by a
wrong, batch-dependent factor; a custom ``compute_loss`` without the count falls back to each
micro-batch's own mean over K.

What :class:`ExactTrainer` changes, and nothing else: the model runs without ``labels``; the
loss is computed from its outputs as a :class:`~bigbatch.LossSum` (``loss_fn``; by default the
shifted token cross-entropy for causal LMs, the unshifted one for seq2seq, masked LM and token
classification) and the Trainer backpropagates ``c · sum``; after the cycle's last backward the
gradient is divided by the cycle's item count summed over micro-batches and ranks
(:mod:`bigbatch.integrations._rule`). The Trainer's own clipping (``max_grad_norm``), optimizer,
scheduler, mixed precision, logging, evaluation, checkpoints and DDP path run as before. The
logged ``loss`` is the exact mean over each optimizer step's items (averaged over the steps
between logs, as the Trainer does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers.models.auto import modeling_auto

from ..loss import LossSum, check_loss, token_cross_entropy
from . import IntegrationError
from ._rule import ExactCycle

__all__ = ["ExactTrainer", "LossFn", "causal_lm_loss", "token_loss"]

# transformers >= 5.20 reads `loss_is_scaled_for_ga`; earlier 5.x divide a loss the model did not
# normalize itself by the cycle's micro-batches (`current_gradient_accumulation_steps`).
_HONOURS_SCALED_FLAG = hasattr(transformers.Trainer, "loss_is_scaled_for_ga")

LossFn = Callable[[Any, torch.Tensor], LossSum]
"""``loss_fn(outputs, labels) -> LossSum``: the model's outputs (``labels`` not passed in)."""


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):  # a model whose forward returns the logits
        return outputs
    return outputs["logits"] if isinstance(outputs, dict) else outputs[0]


def causal_lm_loss(outputs: Any, labels: torch.Tensor) -> LossSum:
    """Next-token cross-entropy: ``logits[:, :-1]`` against ``labels[:, 1:]``, summed, and the
    number of those labels that are not -100 (the items the sum covers)."""
    return token_cross_entropy(_logits(outputs)[..., :-1, :], labels[..., 1:])


def token_loss(outputs: Any, labels: torch.Tensor) -> LossSum:
    """Cross-entropy of every position against its own label (seq2seq decoders, masked LM, token
    and single-label sequence classification), summed, and the count of labels not -100."""
    return token_cross_entropy(_logits(outputs), labels)


def _mapped(names: Any, model_name: str) -> bool:
    return model_name in set(names.values())


def default_loss_fn(model: torch.nn.Module) -> LossFn:
    """The loss ``ExactTrainer`` uses without ``loss_fn=``, chosen from the model's class.

    Raises:
        IntegrationError: the class is none of causal LM, seq2seq LM, masked LM, token
            classification.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    name = type(inner).__name__
    if _mapped(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, name) and not getattr(
            getattr(inner, "config", None), "is_encoder_decoder", False):
        return causal_lm_loss
    if any(_mapped(getattr(modeling_auto, table), name) for table in (
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
            "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")):
        return token_loss
    raise IntegrationError(
        f"ExactTrainer cannot tell how {name} counts the items of its loss: pass "
        "loss_fn=(outputs, labels) -> bigbatch.LossSum(sum, count), e.g. "
        "bigbatch.integrations.transformers.token_loss for single-label classification")


class _DiscardOnTrainBegin(transformers.TrainerCallback):
    """A cycle cut short (an exception, ``auto_find_batch_size`` restarting) is not continued."""

    def __init__(self, cycle: ExactCycle) -> None:
        self.cycle = cycle

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.cycle.discard()


class ExactTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose gradient accumulation is exact: the update of one batch of
    ``per_device_train_batch_size × gradient_accumulation_steps × world`` rows.

    Takes the ``Trainer``'s arguments, plus:

    Args:
        loss_fn: ``loss_fn(outputs, labels) -> LossSum``, called with the model's outputs (the
            model is run without ``labels``) and the batch's ``labels``. Default: from the
            model's class (:func:`default_loss_fn`). For anything else, override
            :meth:`compute_loss_sum`.

    Raises:
        IntegrationError: a setting that would divide the loss a second time or that the rule
            does not cover: ``compute_loss_func=``, ``loss_is_scaled_for_ga`` set to False,
            ``label_smoothing_factor``, DeepSpeed (use ``bigbatch.integrations.deepspeed``),
            DataParallel (``n_gpu > 1``: launch with torchrun), tensor/context/sequence
            parallelism.
    """

    loss_is_scaled_for_ga = True  # c · sum is normalized once per step here: no division by GA

    def __init__(self, *args: Any, loss_fn: LossFn | None = None, **kwargs: Any) -> None:
        if kwargs.get("compute_loss_func") is not None:
            raise IntegrationError(
                "ExactTrainer computes the loss itself: pass your loss as loss_fn=(outputs, "
                "labels) -> bigbatch.LossSum(sum, count) instead of compute_loss_func= (which "
                "the Trainer divides by its own count)")
        if loss_fn is not None and not callable(loss_fn):
            raise IntegrationError(
                f"ExactTrainer: loss_fn must be a function (outputs, labels) -> "
                f"bigbatch.LossSum, got {loss_fn!r}; e.g. "
                "bigbatch.integrations.transformers.causal_lm_loss")
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn if loss_fn is not None else default_loss_fn(self.model)
        # The model gets no labels and no num_items_in_batch: the Trainer then neither counts
        # labels nor gathers that count across ranks; the count comes from loss_fn instead.
        self.model_accepts_loss_kwargs = False
        self._exact = ExactCycle("ExactTrainer.compute_loss")
        self.add_callback(_DiscardOnTrainBegin(self._exact))
        self._refuse()

    def _refuse(self) -> None:
        args, fix = self.args, None
        if self.loss_is_scaled_for_ga is not True:
            fix = ("loss_is_scaled_for_ga is not True, so the Trainer would divide the loss by "
                   "the accumulation steps again: leave it True in ExactTrainer subclasses")
        elif args.label_smoothing_factor:
            fix = ("label_smoothing_factor is applied by the Trainer's own loss, which "
                   "ExactTrainer replaces: set it to 0 and smooth inside loss_fn (a summed "
                   "F.cross_entropy(..., label_smoothing=eps, reduction='sum') and its count)")
        elif self.is_deepspeed_enabled:
            fix = ("DeepSpeed scales and reduces gradients itself: use "
                   "bigbatch.integrations.deepspeed with the DeepSpeed engine")
        elif args.n_gpu > 1:
            fix = (f"{args.n_gpu} GPUs in one process (DataParallel) are not supported: launch "
                   "one process per GPU with torchrun (DDP)")
        elif self.get_tp_size() * self.get_cp_size() * self.get_sp_size() > 1:
            fix = ("tensor, context and sequence parallelism are not supported: only data "
                   "parallelism (DDP, FSDP) averages the gradients this rule expects")
        if fix:
            raise IntegrationError(f"ExactTrainer: {fix}")

    # -- the loss ----------------------------------------------------------------------------

    def compute_loss_sum(self, model: torch.nn.Module, inputs: dict[str, Any],
                         ) -> tuple[LossSum, Any]:
        """One micro-batch's :class:`~bigbatch.LossSum` and the model's outputs.

        Runs ``model`` on ``inputs`` without ``labels`` and calls ``loss_fn(outputs, labels)``.
        Override for a loss that needs more than the outputs and the labels.

        Raises:
            IntegrationError: the batch has no ``labels``.
        """
        if "labels" not in inputs:
            raise IntegrationError(
                f"ExactTrainer: the batch has no 'labels' (keys: {', '.join(inputs)}): give the "
                "collator labels (-100 where nothing is predicted) or override compute_loss_sum")
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return self.loss_fn(outputs, labels), outputs

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        """Training: ``c · sum`` of the micro-batch (normalized once per step, in
        :meth:`training_step`). Evaluation: the batch's own mean, ``sum / count``.

        Raises:
            LossError: ``loss_fn`` returned no :class:`~bigbatch.LossSum` (a bare mean has no
                count).
        """
        ls, outputs = self.compute_loss_sum(model, inputs)
        if model.training and torch.is_grad_enabled():
            loss = self._exact.scaled(ls, expected_micro=self.args.gradient_accumulation_steps,
                                      reduce_sum=self._reduce_sum)
        else:
            ls = check_loss(ls)
            loss = ls.sum / max(int(ls.count), 1)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step (forward, backward of ``c · sum``); after the cycle's last
        micro-batch, the once-per-step normalization, before the Trainer clips and steps.

        Returns:
            What the Trainer adds to its logged loss: 0 within a cycle, the exact mean loss of
            the whole cycle (every rank's items) on its last micro-batch.
        """
        super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients:
            return torch.zeros((), device=self.args.device)
        divisor = self.accelerator.gradient_accumulation_steps  # 1: the Trainer sets it so
        if not _HONOURS_SCALED_FLAG:
            divisor *= self.current_gradient_accumulation_steps
        totals = self._exact.finish(model.parameters(), divisor=divisor,
                                    world=self.accelerator.num_processes,
                                    reduce_sum=self._reduce_sum)
        return torch.tensor(totals.loss, device=self.args.device)

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.reduce(t.to(self.args.device), reduction="sum")
