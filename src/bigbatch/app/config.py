"""The training configuration: one frozen dataclass, read from flags and/or a YAML or TOML file.

Field metadata carries the help text that the command line shows, so the flags, the config-file keys
and the resolved ``config.yaml`` a run writes are the same names (``global_batch`` ⇔
``--global-batch``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import BigBatchError
from ..plan import BatchPlan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["ConfigError", "TrainConfig", "load_config_file"]

# With none of the three given, a run uses global batch 32 cut into micro-batches of 8 (K = 4).
DEFAULT_GLOBAL_BATCH = 32
DEFAULT_MICRO_BATCH = 8


class ConfigError(BigBatchError):
    """A configuration value or file is invalid."""


def _opt(help: str, **kw: Any) -> Any:
    return field(metadata={"help": help, **kw.pop("meta", {})}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a ``bigbatch train`` run (and so its numbers)."""

    global_batch: int | None = _opt(
        "samples per optimizer step over all processes (default 32)", default=None
    )
    micro_batch: int | str | None = _opt(
        "samples per forward/backward pass (default 8), or 'auto': the fastest size that fits "
        "--memory (see bigbatch plan)", default=None)
    accum_steps: int | None = _opt(
        "micro-batches per optimizer step; give any two of the three batch sizes", default=None
    )
    steps: int = _opt("optimizer steps to train", default=400)
    seq_len: int = _opt("tokens (bytes) per sample", default=128)
    lr: float = _opt("peak learning rate (AdamW)", default=3e-3)
    warmup: int = _opt("linear warm-up, in optimizer steps", default=20)
    schedule: str = _opt(
        "learning-rate schedule after warm-up", default="cosine",
        meta={"choices": ("constant", "cosine")},
    )
    weight_decay: float = _opt("AdamW weight decay on matrices", default=0.1)
    clip: float | None = _opt("clip the gradient norm to this (0 or none: off)", default=1.0)
    precision: str = _opt(
        "autocast precision", default="fp32", meta={"choices": ("fp32", "bf16", "fp16")}
    )
    dtype: str = _opt(
        "parameter dtype (float64 for exactness checks)", default="float32",
        meta={"choices": ("float32", "float64", "bfloat16")},
    )
    seed: int = _opt("seed for initialization and data order", default=0)
    data: str | None = _opt(
        "text file, folder of text files, or .jsonl with a 'text' field "
        "(default: the Python standard library's source)", default=None,
    )
    eval_every: int = _opt("evaluate on the validation set every N steps (0: only at the end)",
                           default=100)
    eval_samples: int = _opt("validation samples per evaluation", default=256)
    n_layer: int = _opt("transformer blocks", default=4)
    n_head: int = _opt("attention heads", default=4)
    d_model: int = _opt("model width", default=128)
    batchnorm: str = _opt(
        "a model with BatchNorm layers: warn, convert them to GroupNorm, freeze their statistics, "
        "pool their running statistics over each optimizer step, or refuse it (the default GPT "
        "has none)", default="warn",
        meta={"choices": ("warn", "convert", "freeze", "pooled", "error")},
    )
    save_every: int = _opt("checkpoint every N optimizer steps (0: only when stopping)",
                           default=100)
    save_every_micro: int = _opt("also checkpoint every M micro-batches, mid-cycle (0: off)",
                                 default=0)
    keep: int = _opt("keep the newest N checkpoints", default=3)
    on_nonfinite: str = _opt(
        "a NaN/inf loss or gradient skips that optimizer step, or stops the run with a checkpoint",
        default="skip", meta={"choices": ("skip", "stop")},
    )
    parallel: str = _opt(
        "under torchrun: DistributedDataParallel, or FSDP2 (fully_shard per block)",
        default="ddp", meta={"choices": ("ddp", "fsdp2")},
    )
    grad_sync: str = _opt(
        "under torchrun: sync gradients once per optimizer step, or after every micro-batch "
        "(FSDP2: less memory, K times the communication)",
        default="cycle", meta={"choices": ("cycle", "micro")},
    )
    noise_scale: bool = _opt("measure the gradient noise scale every step (--no-noise-scale: "
                             "off)", default=True)
    accum_schedule: str | None = _opt(
        "change K during training: a step table '0:4,500:8', 'ramp:START:SAMPLES' (global "
        "batch from START samples up over SAMPLES samples) or 'adaptive:KMIN:KMAX:EVERY' (from "
        "the noise scale)", default=None)
    lr_scaling: str = _opt("scale the learning rate with the global batch under --accum-schedule",
                           default="none", meta={"choices": ("none", "linear", "sqrt")})
    memory: str | None = _opt(
        "memory budget for --micro-batch auto and bigbatch plan, e.g. 8GiB (default: 80%% of the "
        "free memory)", default=None)
    checkpoint_activations: bool = _opt(
        "recompute each transformer block's activations in backward instead of keeping them "
        "(less memory, about a third more compute)", default=False)
    on_oom: str = _opt(
        "a micro-batch that runs out of memory is split in two and the step goes on, exact "
        "(split), or the run stops (stop)", default="split", meta={"choices": ("split", "stop")})
    micro_tokens: int | None = _opt(
        "cut each global batch into micro-batches of at most N tokens (rows × longest sample, "
        "samples sorted by length, padding trimmed) instead of --micro-batch samples",
        default=None)
    out: str | None = _opt("run folder (default: runs/<date>-<time>)", default=None)
    device: str = _opt("cpu, cuda, cuda:N, or auto", default="auto")
    overwrite: bool = _opt("replace the run files in an --out folder that holds a run",
                           default=False)

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problems += _type_problems(f, value)
        if problems:
            raise ConfigError("; ".join(problems))
        if self.micro_tokens is not None and self.micro_tokens <= 0:
            raise ConfigError(f"--micro-tokens must be positive, got {self.micro_tokens}")
        for name in ("steps", "seq_len", "n_layer", "n_head", "d_model", "eval_samples"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.micro_tokens is not None and self.micro_tokens < self.seq_len:
            raise ConfigError(f"--micro-tokens {self.micro_tokens} is less than --seq-len "
                              f"{self.seq_len}, so a full-length sample would not fit; give at "
                              f"least {self.seq_len}")
        if self.micro_tokens is not None and self.accum_schedule:
            raise ConfigError("--micro-tokens sets K per step from the lengths, --accum-schedule "
                              "from a schedule; give one of them")
        if self.memory is not None:
            from ..memory import parse_bytes

            try:
                parse_bytes(self.memory)
            except BigBatchError as err:
                raise ConfigError(f"--memory: {err}") from None
        if self.keep <= 0:
            raise ConfigError(f"--keep must be positive, got {self.keep}")
        for name in ("warmup", "eval_every", "save_every", "save_every_micro"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be 0 or more, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.clip is not None and not (self.clip >= 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--clip must be 0 (off) or a positive number, got {self.clip}")
        if self.accum_schedule:  # the form; sizes are checked against the plan at train time
            from ..schedule import parse_accum_schedule

            parse_accum_schedule(self.accum_schedule, micro_batch=1, world_size=1,
                                 k_final=2**62)
        if self.d_model % self.n_head:
            raise ConfigError(
                f"--d-model {self.d_model} is not divisible by --n-head {self.n_head}; "
                "pick a width that is a multiple of the head count"
            )
        if self.auto_micro_batch:
            if self.accum_steps is not None:
                raise ConfigError("--micro-batch auto chooses K itself; drop --accum-steps and "
                                  "give --global-batch")
            if self.micro_tokens is not None:
                raise ConfigError("--micro-batch auto and --micro-tokens both choose how a global "
                                  "batch is cut; give one of them")
        else:
            self.plan()  # the batch triple must add up

    @property
    def auto_micro_batch(self) -> bool:
        """``--micro-batch auto``: the trainer chooses it (see :mod:`bigbatch.planner`)."""
        return self.micro_batch == "auto"

    def plan(self, world_size: int | None = None) -> BatchPlan:
        """The batch plan, filling unspecified sizes from the defaults (32 global, 8 micro).

        Raises:
            ConfigError: ``--micro-batch auto``, which only ``train`` and ``plan`` resolve.
        """
        if self.auto_micro_batch:
            raise ConfigError("--micro-batch auto is chosen by bigbatch train and bigbatch plan; "
                              "give a number here")
        g, m, k = self.global_batch, self.micro_batch, self.accum_steps
        assert not isinstance(m, str)
        given = sum(v is not None for v in (g, m, k))
        if given == 0:
            g, m = DEFAULT_GLOBAL_BATCH, DEFAULT_MICRO_BATCH
        elif given == 1:
            if g is None:
                g = DEFAULT_GLOBAL_BATCH
            else:  # global batch given alone: micro-batches of 8 when they divide it, else K = 1
                m = DEFAULT_MICRO_BATCH if g % DEFAULT_MICRO_BATCH == 0 else g
        return BatchPlan(global_batch=g, micro_batch=m, accum_steps=k, world_size=world_size)

    @property
    def clip_norm(self) -> float | None:
        """The clipping threshold, None when clipping is off."""
        return self.clip or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _type_problems(f: dataclasses.Field, value: Any) -> list[str]:
    name, kind = f.name, str(f.type)
    optional = "None" in kind
    if value is None:
        return [] if optional else [f"{_flag(name)} needs a value"]
    if name == "micro_batch" and value == "auto":
        return []
    if "bool" in kind:
        ok = isinstance(value, bool)
    elif "int" in kind:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if name == "micro_batch" and not ok:
            return [f"{_flag(name)} must be a positive integer or auto, got {value!r}"]
    elif "float" in kind:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        want = kind.replace(" | None", "")
        return [f"{_flag(name)} must be {want}, got {value!r}"]
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        return [f"{_flag(name)} must be one of {', '.join(choices)}, got {value!r}"]
    return []


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of config keys.

    Keys are the field names of :class:`TrainConfig`, with ``_`` or ``-``.

    Raises:
        ConfigError: missing or unreadable file, unknown suffix, bad syntax, unknown keys.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file; give a .yaml, .yml or .toml file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        elif p.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"--config {path}: unknown format; use a .yaml, .yml or .toml file")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--config {path}: cannot parse it ({first})") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    return values
