"""The training configuration: small frozen groups, read from flags and/or a YAML or TOML file.

A run is defined by six groups — :class:`BatchConfig`, :class:`OptimConfig`, :class:`ModelConfig`,
:class:`DataConfig`, :class:`CheckpointConfig` and :class:`RuntimeConfig` — each validating its own
fields when built; :class:`TrainConfig` holds them and checks what spans groups. Every field's name
is also its flag (``global_batch`` ⇔ ``--global-batch``) and its key in a config file, where it may
stand at the top level or under its group's name; field metadata carries the help the command line
shows. Types are checked from the annotations, so ``--steps 2.5`` and ``steps: "10"`` are refused
with the flag named.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import BatchPlanError, BigBatchError
from ..plan import BatchPlan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["BatchConfig", "CheckpointConfig", "ConfigError", "DataConfig", "GROUPS",
           "ModelConfig", "OptimConfig", "RuntimeConfig", "TrainConfig", "flag",
           "load_config_file", "parse_text"]

# With none of the three sizes given, a step takes global batch 32 in micro-batches of 8 (K = 4).
DEFAULT_GLOBAL_BATCH = 32
DEFAULT_MICRO_BATCH = 8


class ConfigError(BigBatchError):
    """A configuration value or file is invalid."""


def option(help: str, default: Any, **choices: Any) -> Any:
    """A config field: its default, and the help text the command line shows."""
    return field(default=default, metadata={"help": help, **choices})


def flag(name: str) -> str:
    """``global_batch`` → ``--global-batch``."""
    return "--" + name.replace("_", "-")


# -- typed values --------------------------------------------------------------------------------

def _alternatives(hint: Any) -> tuple[Any, ...]:
    """The types (and Literal values) a hint admits, unions flattened."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(hint) for a in _alternatives(arg))
    if typing.get_origin(hint) is Literal:
        return tuple(("literal", v) for v in typing.get_args(hint))
    return (hint,)


def _matches(kind: Any, value: Any) -> bool:
    if isinstance(kind, tuple):
        return value == kind[1]
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(hint: Any) -> str:
    names = [repr(k[1]) if isinstance(k, tuple) else k.__name__ for k in _alternatives(hint)
             if k is not type(None)]
    return " or ".join(names)


def parse_text(hint: Any, text: str) -> Any:
    """A command-line word as a value of ``hint`` (``int | Literal["auto"] | None`` …).

    Raises:
        ValueError: the word is none of the types the hint admits.
    """
    for kind in _alternatives(hint):
        if isinstance(kind, tuple):
            if text == str(kind[1]):
                return kind[1]
        elif kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        elif kind is str:
            return text
    raise ValueError(f"needs {_describe(hint)}, got {text!r}")


def _check_fields(group: Any) -> None:
    """Types and choices of every field of a config group, all problems in one message."""
    hints = typing.get_type_hints(type(group))
    problems = []
    for f in dataclasses.fields(group):
        value, hint = getattr(group, f.name), hints[f.name]
        if not any(_matches(kind, value) for kind in _alternatives(hint)):
            problems.append(f"{flag(f.name)} must be {_describe(hint)}, got {value!r}"
                            if value is not None else f"{flag(f.name)} needs a value")
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def _positive(group: Any, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{flag(name)} must be positive, got {value}")


def _not_negative(group: Any, *names: str) -> None:
    for name in names:
        if getattr(group, name) < 0:
            raise ConfigError(f"{flag(name)} must be 0 or more, got {getattr(group, name)}")


# -- the groups ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchConfig:
    """How each optimizer step's batch is cut."""

    global_batch: int | None = option(
        "samples per optimizer step over all processes (default 32)", None)
    micro_batch: int | Literal["auto"] | None = option(
        "samples per forward/backward pass (default 8; it must divide the global batch), or "
        "'auto': the fastest size that fits --memory (see bigbatch plan)", None)
    accum_steps: int | None = option(
        "micro-batches per optimizer step; give any two of the three batch sizes", None)
    micro_tokens: int | None = option(
        "cut each global batch into micro-batches of at most N tokens (rows × longest sample, "
        "samples sorted by length, padding trimmed) instead of --micro-batch samples", None)
    pack: str = option(
        "how variable-length samples are cut into micro-batches: 'partition' (sorted runs "
        "chosen by a measured cost model: the fastest measured), 'rows' (padding-free rows, "
        "several samples per row), 'tokens' (sorted, greedy), 'none' (--micro-batch samples "
        "each); 'auto': partition when the data's lengths vary (or --micro-tokens is given), "
        "else none", "auto",
        choices=("auto", "none", "tokens", "partition", "rows"))
    pack_cost: str | None = option(
        "--pack partition's cost model 'A,B,C': seconds per micro-batch, per token position, "
        "per row x column^2 (default: measured at the start by a short probe, and recorded)",
        None)
    accum_schedule: str | None = option(
        "change K during training: a step table '0:4,500:8', 'ramp:START:SAMPLES' (global batch "
        "from START samples up over SAMPLES samples) or 'adaptive:KMIN:KMAX:EVERY' (from the "
        "noise scale)", None)
    lr_scaling: str = option(
        "scale the learning rate with the global batch under --accum-schedule", "none",
        choices=("none", "linear", "sqrt"))
    memory: str | None = option(
        "memory budget for --micro-batch auto and bigbatch plan, e.g. 8GiB (default: 80%% of the "
        "free memory)", None)

    def __post_init__(self) -> None:
        _check_fields(self)
        _positive(self, "global_batch", "accum_steps", "micro_tokens")
        if isinstance(self.micro_batch, int) and self.micro_batch <= 0:
            raise ConfigError(f"--micro-batch must be positive or auto, got {self.micro_batch}")
        if self.micro_tokens is not None and self.accum_schedule:
            raise ConfigError("--micro-tokens sets K per step from the lengths, --accum-schedule "
                              "from a schedule; give one of them")
        packs = self.pack not in ("auto", "none")
        if packs and self.accum_schedule:
            raise ConfigError(f"--pack {self.pack} sets K per step from the lengths, "
                              "--accum-schedule from a schedule; give one of them")
        if self.pack == "none" and self.micro_tokens is not None:
            raise ConfigError("--pack none cuts by --micro-batch samples, --micro-tokens by "
                              "tokens; drop one of them")
        if self.pack_cost is not None:
            self.cost_model()
        if self.memory is not None:
            from ..memory import parse_bytes

            try:
                parse_bytes(self.memory)
            except BigBatchError as err:
                raise ConfigError(f"--memory: {err}") from None
        if self.accum_schedule:  # the form; sizes are checked against the plan at train time
            from ..schedule import parse_accum_schedule

            parse_accum_schedule(self.accum_schedule, micro_batch=1, world_size=1, k_final=2**62)
        if self.auto_micro_batch:
            if self.accum_steps is not None:
                raise ConfigError("--micro-batch auto chooses K itself; drop --accum-steps and "
                                  "give --global-batch")
            if self.micro_tokens is not None or packs:
                what = "--micro-tokens" if self.micro_tokens is not None else f"--pack {self.pack}"
                raise ConfigError(f"--micro-batch auto and {what} both choose how a global "
                                  "batch is cut; give one of them")
        else:
            self.plan()  # the batch triple must add up

    def cost_model(self) -> Any:
        """``--pack-cost`` as a :class:`bigbatch.CostModel` (None when not given).

        Raises:
            ConfigError: not three numbers >= 0, not all zero.
        """
        if self.pack_cost is None:
            return None
        from ..partition import CostModel

        parts = str(self.pack_cost).split(",")
        try:
            if len(parts) != 3:
                raise ValueError
            return CostModel(*(float(p) for p in parts))
        except (ValueError, BigBatchError):
            raise ConfigError(f"--pack-cost {self.pack_cost!r} is not three numbers >= 0 "
                              "'A,B,C' (seconds per micro-batch, per token position, per row x "
                              "column^2), e.g. 0.002,3e-7,1e-10; or leave it out to measure "
                              "them") from None

    @property
    def auto_micro_batch(self) -> bool:
        """``--micro-batch auto``: the trainer chooses it (see :mod:`bigbatch.planner`)."""
        return self.micro_batch == "auto"

    def plan(self, world_size: int | None = None) -> BatchPlan:
        """The batch plan. Sizes not given come from the defaults: global batch 32, micro-batch 8
        (which must then divide the global batch: nothing is derived silently).

        Raises:
            ConfigError: ``--micro-batch auto``, which only ``train`` and ``plan`` resolve.
            BatchPlanError: the sizes do not add up.
        """
        if self.auto_micro_batch:
            raise ConfigError("--micro-batch auto is chosen by bigbatch train and bigbatch plan; "
                              "give a number here")
        g, m, k = self.global_batch, self.micro_batch, self.accum_steps
        assert not isinstance(m, str)
        given = sum(v is not None for v in (g, m, k))
        if given == 0:
            g, m = DEFAULT_GLOBAL_BATCH, DEFAULT_MICRO_BATCH
        elif given == 1 and g is None:
            g = DEFAULT_GLOBAL_BATCH
        elif given == 1:
            m = DEFAULT_MICRO_BATCH
            try:
                return BatchPlan(global_batch=g, micro_batch=m, world_size=world_size)
            except BatchPlanError as err:
                raise BatchPlanError(f"{err} (micro-batch {m} is the default: give --micro-batch "
                                     f"or --accum-steps to cut global batch {g})") from None
        return BatchPlan(global_batch=g, micro_batch=m, accum_steps=k, world_size=world_size)


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (AdamW), its learning-rate schedule and clipping."""

    steps: int = option("optimizer steps to train", 400)
    lr: float = option("peak learning rate (AdamW)", 3e-3)
    warmup: int = option("linear warm-up, in optimizer steps", 20)
    schedule: str = option("learning-rate schedule after warm-up", "cosine",
                           choices=("constant", "cosine"))
    weight_decay: float = option("AdamW weight decay on matrices", 0.1)
    clip: float | None = option("clip the gradient norm to this (0 or none: off)", 1.0)

    def __post_init__(self) -> None:
        _check_fields(self)
        _positive(self, "steps")
        _not_negative(self, "warmup")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive finite number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.clip is not None and not (self.clip >= 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--clip must be 0 (off) or a positive number, got {self.clip}")

    @property
    def clip_norm(self) -> float | None:
        """The clipping threshold, None when clipping is off."""
        return self.clip or None


@dataclass(frozen=True)
class ModelConfig:
    """The model trained and what it learns: the built-in GPT, a Hugging Face folder or your own."""

    model: str | None = option(
        "the model: the built-in byte-level GPT (default), a Hugging Face model folder (config, "
        "safetensors weights, tokenizer; loaded offline), or MODULE:FUNCTION / file.py:FUNCTION "
        "returning (model, batch, loss_fn)", None)
    task: str = option(
        "what it learns: next-token prediction (causal-lm), sequence classification from "
        "text/label records (classify), or embeddings from query/document pairs with in-batch "
        "negatives (contrastive)", "causal-lm", choices=("causal-lm", "classify", "contrastive"))
    lora: int | None = option("train LoRA adapters of this rank instead of every weight (peft)",
                              None)
    lora_alpha: float | None = option("LoRA scaling alpha (default: 2 × rank)", None)
    lora_targets: str | None = option(
        "comma-separated module names to adapt, e.g. q_proj,v_proj (default: peft's choice for "
        "the architecture)", None)
    lora_dropout: float = option("dropout on the LoRA path", 0.0)
    n_layer: int = option("transformer blocks (built-in GPT)", 4)
    n_head: int = option("attention heads (built-in GPT)", 4)
    d_model: int = option("model width (built-in GPT)", 128)
    dtype: str = option("parameter dtype (float64 for exactness checks)", "float32",
                        choices=("float32", "float64", "bfloat16"))
    checkpoint_activations: bool = option(
        "recompute each transformer block's activations in backward instead of keeping them "
        "(less memory, about a third more compute)", False)
    batchnorm: str = option(
        "a model with BatchNorm layers: warn, convert them to GroupNorm, freeze their statistics, "
        "pool their running statistics over each optimizer step, or refuse it (the default GPT "
        "has none)", "warn", choices=("warn", "convert", "freeze", "pooled", "error"))

    def __post_init__(self) -> None:
        _check_fields(self)
        _positive(self, "n_layer", "n_head", "d_model", "lora")
        if self.lora_alpha is not None and not (self.lora_alpha > 0 and math.isfinite(
                self.lora_alpha)):
            raise ConfigError(f"--lora-alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora is None and (self.lora_alpha is not None or self.lora_targets or
                                  self.lora_dropout):
            raise ConfigError("--lora-alpha, --lora-targets and --lora-dropout shape LoRA "
                              "adapters; give --lora RANK too")
        if self.builtin:
            if self.lora is not None:
                raise ConfigError("--lora adapts a Hugging Face model; give --model PATH (the "
                                  "built-in GPT trains all its weights)")
            if self.task != "causal-lm":
                raise ConfigError(f"--task {self.task} needs an encoder: give --model PATH (a "
                                  "Hugging Face folder); the built-in GPT does causal-lm")
        else:
            shape = [flag(n) for n, d in (("n_layer", 4), ("n_head", 4), ("d_model", 128))
                     if getattr(self, n) != d]
            if shape:
                raise ConfigError(f"{', '.join(shape)} shape the built-in GPT; --model "
                                  f"{self.model} has its own shape, drop them")
        if self.d_model % self.n_head:
            raise ConfigError(f"--d-model {self.d_model} is not divisible by --n-head "
                              f"{self.n_head}; pick a width that is a multiple of the head count")

    @property
    def builtin(self) -> bool:
        """The built-in byte-level GPT (no --model)."""
        return self.model in (None, "gpt")


@dataclass(frozen=True)
class DataConfig:
    """What the model learns from, and how it is evaluated."""

    data: str | None = option(
        "what to learn from: a text file, a folder of text files, or JSONL records (a file or a "
        "folder of them) with text, prompt/completion or messages fields (classify: text/label; "
        "contrastive: query/document); default: the Python standard library's source", None)
    eval_data: str | None = option(
        "validation data in the same form (default: about 5%% of --data, chosen by a hash of each "
        "record's file and line)", None)
    on_bad_sample: str = option(
        "a record with missing fields, an empty response or more than --seq-len tokens is left "
        "out and counted (skip), or stops the run before it starts, naming the line (stop)",
        "skip", choices=("skip", "stop"))
    seq_len: int = option("tokens (bytes) per sample", 128)
    eval_every: int = option("evaluate on the validation set every N steps (0: only at the end)",
                             100)
    eval_samples: int = option("validation samples per evaluation", 256)
    early_stop: int = option(
        "stop when the validation loss has not improved for N evaluations in a row (needs "
        "--eval-every); the best weights are kept in best/ (0: off)", 0)

    def __post_init__(self) -> None:
        _check_fields(self)
        _positive(self, "seq_len", "eval_samples")
        _not_negative(self, "eval_every", "early_stop")
        if self.early_stop and not self.eval_every:
            raise ConfigError(f"--early-stop {self.early_stop} counts evaluations without "
                              "improvement, and --eval-every 0 evaluates only at the end; give "
                              "--eval-every N too")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the run is written and how often its state is saved."""

    out: str | None = option("run folder (default: runs/<date>-<time>)", None)
    overwrite: bool = option("replace the run files in an --out folder that holds a run", False)
    save_every: int = option("checkpoint every N optimizer steps (0: only when stopping)", 100)
    save_every_micro: int = option("also checkpoint every M micro-batches, mid-cycle (0: off)", 0)
    keep: int = option("keep the newest N checkpoints", 3)
    log_to: str = option(
        "experiment trackers that also get the metrics, comma-separated: tensorboard, mlflow "
        "(file store in the run folder), wandb (offline), each its extra; auto: TensorBoard when "
        "installed; none: metrics.jsonl only", "auto")

    def __post_init__(self) -> None:
        _check_fields(self)
        _positive(self, "keep")
        _not_negative(self, "save_every", "save_every_micro")
        from .tracking import parse_log_to

        try:
            parse_log_to(self.log_to)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the steps run: device, seed, precision, processes, and what to do when
    something goes wrong (the engine's own words: skip or stop; auto, split or stop)."""

    device: str = option("cpu, cuda, cuda:N, or auto", "auto")
    seed: int = option("seed for initialization and data order", 0)
    precision: str = option("autocast precision", "fp32", choices=("fp32", "bf16", "fp16"))
    parallel: str = option("under torchrun: DistributedDataParallel, or FSDP2 (fully_shard per "
                           "block)", "ddp", choices=("ddp", "fsdp2"))
    grad_sync: str = option(
        "under torchrun: sync gradients once per optimizer step, or after every micro-batch "
        "(FSDP2: less memory, K times the communication)", "cycle", choices=("cycle", "micro"))
    on_nonfinite: str = option(
        "a NaN/inf loss or gradient skips that optimizer step, or stops the run with a checkpoint",
        "skip", choices=("skip", "stop"))
    max_skips: int = option(
        "with --on-nonfinite skip: stop the run (checkpoint, exit status 1) after N optimizer "
        "steps in a row were skipped for a NaN/inf loss or gradient (0: no limit)", 10)
    on_oom: str = option(
        "a micro-batch that runs out of memory is split in two and the step goes on, exact "
        "(split; auto: where the process group allows it, else stop), or the run stops (stop)",
        "auto", choices=("auto", "split", "stop"))
    noise_scale: bool = option("measure the gradient noise scale every step (--no-noise-scale: "
                               "off)", True)

    def __post_init__(self) -> None:
        _check_fields(self)
        _not_negative(self, "max_skips")


GROUPS: tuple[tuple[str, type, str], ...] = (
    ("batch", BatchConfig, "batch"),
    ("optim", OptimConfig, "optimizer"),
    ("model", ModelConfig, "model"),
    ("data", DataConfig, "data"),
    ("checkpoint", CheckpointConfig, "run folder and checkpoints"),
    ("runtime", RuntimeConfig, "runtime"),
)
"""``(attribute of TrainConfig, group class, title on the command line)`` in order."""

_GROUP_OF = {f.name: attr for attr, cls, _ in GROUPS for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a ``bigbatch train`` run (and so its numbers), in groups.

    Build one from flat keys with :meth:`of` (``TrainConfig.of(lr=1e-3, global_batch=64)``).
    """

    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if self.model.task != "causal-lm" and self.batch.micro_tokens is not None:
            raise ConfigError(f"--micro-tokens packs sequences of next-token prediction; --task "
                              f"{self.model.task} cuts by --micro-batch")
        if self.model.task != "causal-lm" and self.batch.pack not in ("auto", "none"):
            raise ConfigError(f"--pack {self.batch.pack} packs sequences of next-token "
                              f"prediction; --task {self.model.task} cuts by --micro-batch "
                              "(drop --pack)")
        if self.model.task == "contrastive" and self.checkpoint.save_every_micro:
            raise ConfigError("--save-every-micro: a contrastive step embeds the whole cycle at "
                              "once, so it has no checkpoint mid-cycle; use --save-every")
        schedule = self.batch.accum_schedule or ""
        if schedule.startswith("adaptive:") and self.runtime.parallel == "fsdp2":
            raise ConfigError(f"--accum-schedule {schedule} follows the noise scale, which "
                              "--parallel fsdp2 cannot measure (its sharding hides each rank's "
                              "gradient), so K would never change; use --parallel ddp, or a step "
                              "table or ramp")
        if schedule.startswith("adaptive:") and not self.runtime.noise_scale:
            raise ConfigError(f"--accum-schedule {schedule} follows the noise scale, which "
                              "--no-noise-scale turns off; drop one of them")
        tokens, seq = self.batch.micro_tokens, self.data.seq_len
        if tokens is not None and tokens < seq:
            raise ConfigError(f"--micro-tokens {tokens} is less than --seq-len {seq}, so a "
                              f"full-length sample would not fit; give at least {seq}")

    @classmethod
    def of(cls, **values: Any) -> TrainConfig:
        """A config from flat keys (the flag names with underscores); the rest default.

        Raises:
            ConfigError: an unknown key, or a value a group refuses.
        """
        unknown = sorted(set(values) - set(_GROUP_OF))
        if unknown:
            raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(unknown)}; known keys: {', '.join(sorted(_GROUP_OF))}")
        parts: dict[str, dict[str, Any]] = {attr: {} for attr, _, _ in GROUPS}
        for key, value in values.items():
            parts[_GROUP_OF[key]][key] = value
        return cls(**{attr: group(**parts[attr]) for attr, group, _ in GROUPS})

    def flat(self) -> dict[str, Any]:
        """Every field by its flat key."""
        return {k: v for attr, _, _ in GROUPS for k, v in dataclasses.asdict(
            getattr(self, attr)).items()}

    def replace(self, **values: Any) -> TrainConfig:
        """A copy with some flat keys changed (validated again)."""
        return TrainConfig.of(**{**self.flat(), **values})

    def to_file_dict(self) -> dict[str, dict[str, Any]]:
        """The groups as nested mappings, for a run's ``config.yaml`` (reusable as ``--config``)."""
        return {attr: dataclasses.asdict(getattr(self, attr)) for attr, _, _ in GROUPS}

    def plan(self, world_size: int | None = None) -> BatchPlan:
        """The batch plan (see :meth:`BatchConfig.plan`)."""
        return self.batch.plan(world_size)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file of config keys, as flat keys.

    Keys are the field names (with ``_`` or ``-``), at the top level or under their group's name
    (``batch:``, ``optim:`` …, as a run's ``config.yaml`` writes them). YAML reads ``1e-3`` as a
    string: numeric strings are accepted for float keys.

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
    values: dict[str, Any] = {}
    groups = {attr for attr, _, _ in GROUPS}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in groups and isinstance(value, Mapping):
            values.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            values[key] = value
    unknown = sorted(set(values) - set(_GROUP_OF))
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; known keys: {', '.join(sorted(_GROUP_OF))}")
    hints = {f.name: typing.get_type_hints(cls)[f.name]
             for _, cls, _ in GROUPS for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if isinstance(value, str) and float in _alternatives(hints[key]):
            try:
                values[key] = float(value)
            except ValueError:
                pass  # the group names the bad value
    return values
