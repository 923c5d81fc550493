"""A Hugging Face model folder: loaded offline through transformers' Auto classes, LoRA by peft.

The folder holds a ``config.json``, the weights (``*.safetensors``) and a tokenizer, as
``save_pretrained`` writes them; nothing is downloaded (``local_files_only`` and
``HF_HUB_OFFLINE``). The task picks the head: ``causal-lm`` → ``AutoModelForCausalLM``,
``classify`` → ``AutoModelForSequenceClassification`` (a new head, initialized from the seed),
``contrastive`` → ``AutoModel`` whose token states are mean-pooled into one embedding per text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.tokenize import HFTokenizer

__all__ = ["HFModel", "is_model_folder", "load_hf", "load_hf_tokenizer", "max_positions",
           "transformer_blocks"]


def is_model_folder(spec: str) -> bool:
    return Path(spec).is_dir()


@dataclass
class HFModel:
    """What :func:`load_hf` returns."""

    model: torch.nn.Module
    tokenizer: Any
    path: Path
    lora: bool


class MeanPooled(torch.nn.Module):
    """An encoder whose output is the mean of its last hidden states over real tokens."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask
                              ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


def _require(package: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"this needs the {package} package: pip install 'bigbatch[{extra}]'"
                          ) from None


def _config(folder: Path, path: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = _require("transformers", "transformers")
    transformers.utils.logging.disable_progress_bar()  # the run's own progress is enough
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--model {path}: no config.json there; give a folder written by "
                          "save_pretrained (config.json, *.safetensors, tokenizer files)")
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--model {path}: transformers cannot read its config.json ({_line(err)})"
                          ) from None


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """The folder's tokenizer (checking first that the folder holds a model configuration).

    Raises:
        ConfigError: no config.json, or no tokenizer that transformers can load.
    """
    _config(Path(path), path)
    transformers = _require("transformers", "transformers")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(Path(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"--model {path}: no usable tokenizer in the folder ({_line(err)}); save "
                          "the tokenizer beside the model (tokenizer.save_pretrained(folder))"
                          ) from None
    if len(tok) < 2 or not tok("a tokenizer probe")["input_ids"]:
        # transformers 5 builds an empty tokenizer from config.json alone instead of failing
        raise ConfigError(f"--model {path}: no usable tokenizer in the folder (it has no "
                          "vocabulary); save the tokenizer beside the model "
                          "(tokenizer.save_pretrained(folder))")
    return HFTokenizer(tok)


def max_positions(config: Any) -> int | None:
    """The longest input the model's configuration allows (None when it names no limit)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_hf(path: str, *, task: str, seq_len: int, dtype: torch.dtype, num_labels: int = 0,
            lora: int | None = None, lora_alpha: float | None = None,
            lora_targets: str | None = None, lora_dropout: float = 0.0,
            checkpoint_activations: bool = False) -> HFModel:
    """Load the folder for ``task``; returns the model (in ``dtype``), its tokenizer, whether LoRA.

    Raises:
        ConfigError: not a model folder, no tokenizer, ``seq_len`` above the model's positions,
            transformers/peft missing, or LoRA targets the model does not have.
    """
    transformers = _require("transformers", "transformers")
    folder = Path(path)
    config = _config(folder, path)
    tokenizer = load_hf_tokenizer(path).tok
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"--seq-len {seq_len} is more than the {limit} positions of --model "
                          f"{path}; give --seq-len {limit} or less")
    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "classify": transformers.AutoModelForSequenceClassification,
            "contrastive": transformers.AutoModel}[task]
    kwargs: dict[str, Any] = {"local_files_only": True}
    if task == "classify":
        kwargs.update(num_labels=num_labels)
        if getattr(config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            kwargs.update(pad_token_id=tokenizer.pad_token_id)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # its load report: we say it in one line
    try:
        model = auto.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"--model {path}: cannot load it for --task {task} ({_line(err)})"
                          ) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    model = model.to(dtype)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # training: no key/value cache
    if checkpoint_activations:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"--checkpoint-activations: {type(model).__name__} does not support "
                              "gradient checkpointing; drop the flag")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = _with_lora(model, task, lora, lora_alpha, lora_targets, lora_dropout)
    if task == "contrastive":
        model = MeanPooled(model)
    return HFModel(model, tokenizer, folder, bool(lora))


def _with_lora(model: torch.nn.Module, task: str, r: int, alpha: float | None,
               targets: str | None, dropout: float) -> torch.nn.Module:
    peft = _require("peft", "lora")
    kind = {"causal-lm": "CAUSAL_LM", "classify": "SEQ_CLS", "contrastive": "FEATURE_EXTRACTION"}
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
        target_modules=[t.strip() for t in targets.split(",")] if targets else None,
        task_type=kind[task])
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"--lora: {_line(err)}; name the layers to adapt with --lora-targets "
                          "(e.g. q_proj,v_proj or c_attn)") from None


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes its ``_no_split_modules`` names), for FSDP2."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__
