"""The models, data and training steps that ``python -m benchmarks peers`` compares (and that
the other benchmarks reuse: the model builder, the hand loop, the losses, the optimizer).

Two models, both byte-level language models over 256 token ids, random initialization, nothing
downloaded:

* ``default``: :class:`bigbatch.app.models.gpt.GPT` with the ``bigbatch train`` shape (4 layers,
  width 128, 4 heads, 128-byte samples);
* ``gpt2``: ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` of the same size
  (4 layers, width 128, 4 heads, ``n_positions`` = sequence length, vocabulary 256, dropout
  off), wrapped so that ``model(input_ids)`` returns the logits.

Data: the bytes of the Python standard library's own sources
(:func:`bigbatch.app.data.load_documents` with ``None``), cut into 128-byte windows (documents'
last windows are padded), and each row's labels then cut at a random length by
:func:`bigbatch.app.data.vary_lengths`: the micro-batches of a cycle hold different numbers of
real tokens, which is where a per-micro-batch mean loss divided by K differs from the token mean
over the cycle.

Each *method* takes one optimizer step from a cycle (a list of K micro-batches), with the same
optimizer (AdamW, ``lr`` 1e-3, betas 0.9/0.95, weight decay 0.1, one parameter group) and the same
gradient clipping (global L2 norm 1.0, applied once, on the accumulated gradient):

* ``hand``: the plain loop: ``(mean loss / K).backward()`` per micro-batch, then
  ``clip_grad_norm_``, ``step``, ``zero_grad``; ``hand2`` is a second copy of it, timed as if it
  were another method: the spread between the two is the noise of the measurement;
* ``bigbatch``: ``Accumulator(model, optimizer, clip_grad_norm=1.0).step(cycle, loss_fn)`` with
  ``loss_fn`` returning ``LossSum(summed token loss, token count)``;
* ``accelerate``: ``Accelerator(gradient_accumulation_steps=K)``: ``with
  accelerator.accumulate(model)``: mean loss, ``accelerator.backward``, ``clip_grad_norm_`` when
  ``sync_gradients``, ``optimizer.step()``, ``optimizer.zero_grad()`` (the prepared optimizer skips
  both until the K-th micro-batch);
* ``lightning``: a ``LightningModule`` whose ``training_step`` returns the mean loss, trained by
  ``Trainer(accumulate_grad_batches=K, gradient_clip_val=1.0, max_steps=S)`` on the cycles'
  micro-batches in order (in a thread of its own, fed one cycle at a time);
* ``hftrainer``: ``transformers.Trainer(gradient_accumulation_steps=K, max_grad_norm=1.0)``
  with its own ``num_items_in_batch`` normalization (``compute_loss_func``), fed the same way;
* ``accelerate_bb``, ``lightning_bb``, ``hftrainer_bb``: the same trainers with their bigbatch
  integration (:mod:`benchmarks.trainer_methods`);
* ``full``: the reference, written here without the engine: the cycle's micro-batches
  concatenated into one batch, one forward, the loss the mean over *all* its real tokens, one
  backward, ``clip_grad_norm_``, ``step``.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import Accumulator
from bigbatch.app.data import (
    TokenWindows,
    load_documents,
    split_documents,
    take_samples,
    vary_lengths,
)
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.loss import IGNORE_INDEX, LossSum, token_cross_entropy

Batch = dict[str, torch.Tensor]
Cycle = list[Batch]

MODELS = ("default", "gpt2")
PEERS = ("accelerate", "lightning", "hftrainer")
METHODS = ("hand", "hand2", "bigbatch", "accelerate", "accelerate_bb", "lightning",
           "lightning_bb", "hftrainer", "hftrainer_bb")
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0


@dataclass(frozen=True)
class Shape:
    """Model shape shared by both models (the quick smoke run uses a tiny one)."""

    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128


FULL_SHAPE = Shape()
QUICK_SHAPE = Shape(n_layer=1, n_head=2, d_model=32, seq_len=32)


def available(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[package] is None (blocked)
        return False


def missing_packages(name: str) -> list[str]:
    """Packages a model or method needs that are not installed."""
    need = {"gpt2": ["transformers"], "accelerate": ["accelerate"],
            "lightning": ["lightning"], "hftrainer": ["transformers"]}.get(name, [])
    return [p for p in need if not available(p)]


# -- models ------------------------------------------------------------------------------------

class LogitsOnly(nn.Module):
    """A Hugging Face causal LM whose forward takes ``input_ids`` and returns only the logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=input_ids, use_cache=False).logits


def build_model(name: str, shape: Shape, seed: int = 0) -> nn.Module:
    """A freshly initialized model (``torch.manual_seed(seed)`` first); float32, on CPU."""
    torch.manual_seed(seed)
    if name == "default":
        return GPT(GPTConfig(seq_len=shape.seq_len, n_layer=shape.n_layer, n_head=shape.n_head,
                             d_model=shape.d_model))
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = GPT2Config(vocab_size=256, n_positions=shape.seq_len, n_embd=shape.d_model,
                            n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                            use_cache=False)
        return LogitsOnly(GPT2LMHeadModel(config))
    raise ValueError(f"unknown model {name!r}")


def describe_model(name: str, model: nn.Module, shape: Shape) -> str:
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    kind = "bigbatch GPT" if name == "default" else "transformers GPT2LMHeadModel"
    return (f"{kind}, {shape.n_layer} layers, width {shape.d_model}, {shape.n_head} heads, "
            f"{shape.seq_len}-byte samples, vocabulary 256, {n:,} parameters")


# -- data --------------------------------------------------------------------------------------

class Corpus:
    """Padded, variable-length micro-batches of the standard library's source bytes.

    Cycles are drawn in order from one seed-keyed stream of samples, so every call gives new data
    and the same seed gives the same cycles; :meth:`restart` goes back to the stream's start (each
    part of the benchmark starts there, so its data do not depend on what ran before it).
    """

    def __init__(self, seq_len: int, seed: int = 0) -> None:
        train, _ = split_documents(load_documents(None))
        self.windows = TokenWindows(train, seq_len)
        self.seed = seed
        self.restart()

    def restart(self) -> None:
        self._next = 0
        self._cycles = 0

    def cycle(self, k: int, micro: int, device: torch.device | str = "cpu") -> Cycle:
        """``k`` micro-batches of ``micro`` rows, labels cut at random lengths per row."""
        idx = take_samples(len(self.windows), self.seed, self._next, k * micro)
        self._next += k * micro
        batch = vary_lengths(self.windows.batch(idx), self.seed, self._cycles)
        self._cycles += 1
        return [{key: value[i * micro:(i + 1) * micro].to(device) for key, value in batch.items()}
                for i in range(k)]

    def cycles(self, n: int, k: int, micro: int, device: torch.device | str = "cpu",
               ) -> list[Cycle]:
        return [self.cycle(k, micro, device) for _ in range(n)]


def random_cycle(k: int, micro: int, seq_len: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> Cycle:
    """``k`` micro-batches of random bytes, labels cut at random lengths (for memory runs)."""
    out = []
    for _ in range(k):
        ids = torch.randint(0, 256, (micro, seq_len + 1), generator=generator)
        keep = torch.randint(1, seq_len + 1, (micro, 1), generator=generator)
        labels = torch.where(torch.arange(seq_len) < keep, ids[:, 1:], IGNORE_INDEX)
        out.append({"input_ids": ids[:, :-1].to(device), "labels": labels.to(device)})
    return out


# -- losses ------------------------------------------------------------------------------------

def mean_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Token cross-entropy averaged over this micro-batch's own real tokens (the usual loss)."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def sum_loss(model: nn.Module, batch: Batch) -> LossSum:
    """The summed token cross-entropy and the token count, for the engine."""
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


# -- methods -----------------------------------------------------------------------------------

class Method:
    """One way of taking an optimizer step from a cycle; owns its model and optimizer."""

    name = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def step(self, cycle: Cycle) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the method holds (a trainer's thread); nothing for most."""


class HandLoop(Method):
    """``(mean loss / K).backward()`` per micro-batch; clip, step and zero_grad once."""

    name = "hand"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.optimizer = make_optimizer(model)

    def step(self, cycle: Cycle) -> None:
        k = len(cycle)
        for batch in cycle:
            (mean_loss(self.model, batch) / k).backward()
        self.apply()

    def apply(self) -> None:
        """Clip the accumulated gradient, step, and zero it."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class BigBatch(Method):
    """``Accumulator.step`` with a ``LossSum`` loss (default options but clipping)."""

    name = "bigbatch"

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model)
        self.acc = Accumulator(model, make_optimizer(model), clip_grad_norm=CLIP, **options)

    def step(self, cycle: Cycle) -> None:
        self.acc.step(cycle, sum_loss)


class AccelerateLoop(Method):
    """The loop of Accelerate's gradient-accumulation guide, one Accelerator per K.

    Accelerate keeps its accumulation settings in a process-wide singleton that each new
    ``Accelerator`` overwrites, so only the most recently built one is valid to step.
    """

    name = "accelerate"

    def __init__(self, model: nn.Module, k: int, device: torch.device) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, PartialState

        super().__init__(model)
        if PartialState._shared_state and PartialState().device.type != device.type:
            # Accelerate keeps one device per process; the float64 part runs on CPU after a CUDA
            # speed part, so its process-wide state is cleared (an internal Accelerate call).
            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(gradient_accumulation_steps=k, cpu=device.type == "cpu")
        self.prepared, self.optimizer = self.accelerator.prepare(model, make_optimizer(model))

    def step(self, cycle: Cycle) -> None:
        acc = self.accelerator
        for batch in cycle:
            with acc.accumulate(self.prepared):
                loss = mean_loss(self.prepared, batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.prepared.parameters(), CLIP)
                self.optimizer.step()
                self.optimizer.zero_grad()


class FullBatch(HandLoop):
    """The truth: one pass over the concatenated cycle, loss = mean over all its real tokens."""

    name = "full"

    def step(self, cycle: Cycle) -> None:
        batch = {key: torch.cat([b[key] for b in cycle]) for key in cycle[0]}
        mean_loss(self.model, batch).backward()
        self.apply()


def make_method(name: str, model: nn.Module, k: int, device: torch.device, steps: int = 0,
                workdir: str = ".") -> Method:
    """A method by name; ``hand2`` is a second, identical hand loop (an A/A noise check).

    The trainers that run their own loop (Lightning, the HF Trainer) train for exactly ``steps``
    optimizer steps and must be closed after them (:mod:`benchmarks.trainer_methods`);
    ``workdir`` is the HF Trainer's output folder (it writes nothing there).
    """
    if name in ("hand", "hand2"):
        return HandLoop(model)
    if name == "bigbatch":
        return BigBatch(model)
    if name == "accelerate":
        return AccelerateLoop(model, k, device)
    if name == "full":
        return FullBatch(model)
    from .trainer_methods import make_trainer_method

    return make_trainer_method(name, model, k, steps, device, workdir)


def clone(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights."""
    return copy.deepcopy(model)
