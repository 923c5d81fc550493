"""What a run leaves besides its metrics: the trained model, sampled completions, an export.

* the built-in GPT (or a ``module:function`` model): ``model.safetensors``;
* a Hugging Face model: ``model/`` (``save_pretrained`` with its tokenizer: transformers loads it
  as it loads the folder it came from); with LoRA ``adapter/`` (the adapters only, as peft saves
  them) — ``bigbatch export RUN --merge`` folds them into the weights;
* a causal LM: ``samples.md``, a few completions sampled (seeded) from held-out prompts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

from .config import ConfigError, TrainConfig
from .data.samples import SupervisedSamples
from .data.windows import TokenWindows
from .workload import Workload, fresh_model

__all__ = ["export_run", "final_model", "sample_completions", "save_final", "write_samples"]

PROMPTS, NEW_TOKENS, TEMPERATURE = 3, 48, 0.8


def final_model(work: Workload, config: TrainConfig, weights: dict | None) -> torch.nn.Module:
    """The trained model as one module: the workload's, or (FSDP2: ``weights`` gathered from the
    shards) a fresh copy on the CPU holding them — usable on one rank alone."""
    if weights is None:
        return work.model
    model = fresh_model(work, config)
    model.load_state_dict(weights)
    return model


def save_final(work: Workload, model: torch.nn.Module, out: Path) -> Path:
    """Write the trained ``model`` (:func:`final_model`) into ``out``; returns the path.

    Written under a temporary name and renamed into place, so that a process killed while
    writing leaves no half model: its presence marks the run finished (``runfolder.is_finished``).
    """
    for stale in out.glob(".final.tmp-*"):  # a kill while writing, on an earlier try
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=out))
    try:
        if work.kind != "hf":
            save_model(model, str(staging / "model.safetensors"))
            name = "model.safetensors"
        else:
            assert work.hf is not None
            name = "adapter" if work.hf.lora else "model"
            inner = model.encoder if hasattr(model, "encoder") and \
                work.task.name == "contrastive" else model
            inner.save_pretrained(staging / name)
            work.hf.tokenizer.save_pretrained(staging / name)
        if (out / name).is_dir():  # a run extended with --steps: the earlier final model
            os.replace(out / name, staging / "earlier")
        os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / name


@torch.no_grad()
def sample_completions(work: Workload, model: torch.nn.Module, seed: int,
                       ) -> list[tuple[str, str]]:
    """``(prompt, completion)`` for a few held-out prompts: the prompt of a validation record
    (what precedes its first trained token), or the first tokens of a validation window. Sampled
    at temperature 0.8 from a generator seeded by ``seed``; the run's random state is untouched.
    """
    tok = work.tokenizer
    device = next(model.parameters()).device
    if tok is None or work.task.name != "causal-lm" or not len(work.val):
        return []
    picks = torch.linspace(0, len(work.val) - 1, min(PROMPTS, len(work.val))).round().long()
    batch = work.val.batch(picks)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for row in range(len(picks)):
                prompt = _prompt(work.val, batch, row)
                ids = torch.tensor([prompt], device=device)
                new = _generate(work, model, ids)
                out.append((tok.decode(prompt), tok.decode(new)))
    finally:
        model.train(was_training)
    return out


def _prompt(samples: Any, batch: dict[str, torch.Tensor], row: int) -> list[int]:
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    if isinstance(samples, SupervisedSamples):
        trained = (labels != -100).nonzero()
        cut = int(trained[0]) + 1 if len(trained) else len(ids)
    else:  # a window of plain text: its first quarter
        assert isinstance(samples, TokenWindows)
        real = int((labels != -100).sum())
        cut = max(1, min(real, samples.seq_len // 4))
    return ids[:cut].tolist()


def _generate(work: Workload, model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    # the built-in GPT's positions (records data too: its windows are not TokenWindows then)
    limit = getattr(getattr(model, "config", None), "seq_len", None) or (
        work.train.seq_len if isinstance(work.train, TokenWindows) else None)
    if work.kind == "hf":
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=True, temperature=TEMPERATURE, top_k=0,
                                  max_new_tokens=NEW_TOKENS,
                                  pad_token_id=work.tokenizer.pad_id)  # type: ignore[union-attr]
        return got[0, ids.shape[1]:].tolist()
    new: list[int] = []
    for _ in range(NEW_TOKENS):  # the built-in GPT: one token at a time within its positions
        context = ids[:, -limit:] if limit else ids
        logits = model(context)[0, -1].float() / TEMPERATURE
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        ids = torch.cat([ids, nxt[None]], 1)
        new.append(int(nxt))
    return new


def write_samples(path: Path, samples: list[tuple[str, str]]) -> None:
    lines = ["# Sampled completions of held-out prompts", "",
             f"Temperature {TEMPERATURE}, {NEW_TOKENS} new tokens, seeded by the run's seed.", ""]
    for i, (prompt, completion) in enumerate(samples, 1):
        lines += [f"## {i}", "", "prompt:", "", "```", prompt, "```", "", "completion:", "",
                  "```", completion, "```", ""]
    path.write_text("\n".join(lines))


def export_run(run: Path, target: Path, *, merge: bool) -> Path:
    """Write a run's trained Hugging Face model as a folder transformers loads.

    Full fine-tuning: a copy of ``run/model``. LoRA: with ``merge`` the base model from the run's
    ``--model`` folder with the adapters folded into its weights; without, a copy of the adapters.

    Raises:
        ConfigError: not a finished run of a Hugging Face model, ``target`` exists, or ``merge``
            without adapters.
    """
    from .runfolder import load_run_config

    if target.exists():
        raise ConfigError(f"--out {target} exists; give a new folder (nothing is overwritten)")
    config = load_run_config(run)
    if config.model.builtin or not (run / "model").is_dir() and not (run / "adapter").is_dir():
        raise ConfigError(f"{run}: holds no Hugging Face model or adapters (a finished run of "
                          "--model PATH writes model/ or adapter/); nothing to export")
    lora = (run / "adapter").is_dir()
    if merge and not lora:
        raise ConfigError(f"{run}: trained every weight (no adapters to merge); export without "
                          "--merge, or use run/model directly")
    if not merge:
        shutil.copytree(run / ("adapter" if lora else "model"), target)
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import transformers

    from .models.hf import load_hf

    base = load_hf(config.model.model, task=config.model.task,  # type: ignore[arg-type]
                   seq_len=config.data.seq_len,
                   dtype=getattr(torch, config.model.dtype),  # the dtype it was trained in
                   num_labels=len(_labels(run))).model
    inner = base.encoder if config.model.task == "contrastive" else base
    merged = peft.PeftModel.from_pretrained(inner, run / "adapter").merge_and_unload()
    merged.save_pretrained(target)
    transformers.AutoTokenizer.from_pretrained(run / "adapter").save_pretrained(target)
    return target


def _labels(run: Path) -> dict[str, int]:
    """classify's classes, as the run recorded them in run.json."""
    info = run / "run.json"
    return json.loads(info.read_text()).get("labels", {}) if info.is_file() else {}
