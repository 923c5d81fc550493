"""``bigbatch`` command line: ``train``, ``verify``, ``compare``, ``plan`` and ``export``.

Each subcommand is a plain function. Flags are generated from the config groups of
:mod:`.config`, one argparse group each, so the flags, the config-file keys and a run's
``config.yaml`` share one set of names; a command offers only the flags it uses. User mistakes
print one line on stderr and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..errors import BigBatchError
from .config import GROUPS, ConfigError, TrainConfig, flag, load_config_file, parse_text

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2

# The config keys each command uses (train: all of them).
_MODEL = ("model", "task", "lora", "lora_alpha", "lora_targets", "lora_dropout", "n_layer",
          "n_head", "d_model", "dtype", "checkpoint_activations", "batchnorm")
_BATCH = ("global_batch", "micro_batch", "accum_steps")
_DATA = ("data", "seq_len", "on_bad_sample")
VERIFY_KEYS = (*_BATCH, *_MODEL, *_DATA, "lr", "clip", "device", "seed", "precision")
COMPARE_KEYS = (*_BATCH, *_MODEL, *_DATA, "lr", "warmup", "schedule", "weight_decay", "clip",
                "out", "overwrite", "device", "seed", "precision")
PLAN_KEYS = ("global_batch", "memory", *_MODEL, *_DATA, "device", "seed", "precision", "lr",
             "weight_decay")


class UsageError(BigBatchError):
    """A command-line mistake found by the argument parser."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised instead of printed with usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _word(hint: Any, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_text(hint, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _add_config_flags(parser: argparse.ArgumentParser, only: Collection[str] | None = None,
                      skip: Collection[str] = ()) -> None:
    """The config groups' fields as flags, one argparse group each (those in ``only``)."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or TOML file of the same keys as these flags (flags win)")
    for _, cls, title in GROUPS:
        names = [f for f in dataclasses.fields(cls)
                 if (only is None or f.name in only) and f.name not in skip]
        if not names:
            continue
        group = parser.add_argument_group(title, (cls.__doc__ or "").split("\n")[0])
        hints = typing.get_type_hints(cls)
        for f in names:
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name,
                                      "help": f.metadata["help"]}
            if hints[f.name] is bool:  # --flag / --no-flag
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _word(hints[f.name], f.name)
                if "choices" in f.metadata:
                    kwargs["choices"] = f.metadata["choices"]
                else:
                    kwargs["metavar"] = f.name.upper()
            group.add_argument(flag(f.name), **kwargs)


def _config(args: argparse.Namespace, own: Sequence[str] = (), **defaults: Any) -> TrainConfig:
    """TrainConfig from defaults < config file < flags (subcommand-only flags left out)."""
    values: dict[str, Any] = dict(defaults)
    if "config" in args:
        values.update(load_config_file(args.config))
    known = {f.name for _, cls, _ in GROUPS for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in known and k not in own})
    return TrainConfig.of(**values)


def _auto_resume(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """``--resume auto``: the config the flags describe, and whether ``--out`` holds it to
    continue (else a new run starts there)."""
    from .runfolder import differences, extended, is_finished, saved_config

    config = _config(args)
    if not config.checkpoint.out:
        raise UsageError("--resume auto continues (or starts) the run in --out; give --out DIR")
    out = Path(config.checkpoint.out)
    saved = saved_config(out)
    if saved is None:  # nothing there yet, or stopped before its config was written
        started = out.is_dir() and all(
            p.name in ("run.json", "fingerprint.json", ".lock") or p.name.startswith(
                (".run.json.tmp-", ".config.yaml.tmp-", ".fingerprint.json.tmp-"))
            for p in out.iterdir())
        return config.replace(overwrite=started), False  # anything else there: refused
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # the same run with --steps raised is that run, extended (as --resume DIR --steps N)
    same = not differences(saved, config.replace(steps=saved.optim.steps), world)
    if same and config.optim.steps != saved.optim.steps:
        saved = extended(out, saved, config.optim.steps)
    diffs = [] if same else differences(saved, config, world)
    if diffs:
        raise ConfigError(f"--out {out} holds another run: {'; '.join(diffs[:3])}; give another "
                          f"--out, or --resume {out} alone to continue that run as configured")
    if is_finished(out, saved):
        raise ConfigError(f"--out {out} holds this run, finished ({saved.optim.steps} steps); "
                          "nothing to continue: give another --out for a new run")
    return saved, True


def cmd_train(args: argparse.Namespace) -> int:
    from .runfolder import extended, load_run_config
    from .startup import plural
    from .trainer import RunStopped, train

    if args.resume == "auto":
        config, resume = _auto_resume(args)
    elif args.resume is not None:
        known = {f.name for _, cls, _ in GROUPS for f in dataclasses.fields(cls)} | {"config"}
        extra = sorted(flag(k) for k in vars(args) if k in known and k != "steps")
        if extra:
            raise UsageError(f"--resume continues a run with its own config.yaml (only --steps "
                             f"may be raised); drop {', '.join(extra)}")
        config, resume = load_run_config(Path(args.resume)), True
        if "steps" in args:  # extend the run: config.yaml gets the new total once it resumes
            config = extended(Path(args.resume), config, args.steps)
    else:
        config, resume = _config(args), False
    try:
        result = train(config, resume=resume)
    except RunStopped as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"bigbatch: {stop}", file=sys.stderr)
        return stop.exit_code
    diverged = not math.isfinite(result.final_val_loss)  # a run that ends on NaN did not work
    if not result.main:
        return 1 if diverged else 0
    print(f"final validation {result.final_metrics}; training loss "
          f"{result.final_train_loss:.4f}; {plural(result.steps, 'step')} in {result.seconds:.0f}s")
    print(f"run folder: {result.out}")
    if diverged:
        print(f"bigbatch: error: the final validation loss is {result.final_val_loss}: the run "
              "diverged; lower --lr or check the data (see metrics.jsonl for skipped steps)",
              file=sys.stderr)
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from ..verify import default_rtol, format_table, verify
    from .models.factory import is_factory
    from .verify import default_verify_inputs, factory_verify_inputs

    config = _config(args, own=("steps",), steps=args.verify_steps)
    plan = config.plan()
    if not config.model.builtin and is_factory(config.model.model):  # type: ignore[arg-type]
        model, batches, loss_fn, make_opt = factory_verify_inputs(config.model.model, config)
    else:
        model, batches, loss_fn, make_opt = default_verify_inputs(config, config.optim.steps)
    dtype = {"float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16}[config.model.dtype]
    precision: Any = config.runtime.precision
    rtol = args.rtol if args.rtol is not None else default_rtol(dtype, precision)
    report = verify(model, batches, loss_fn, plan=plan, make_optimizer=make_opt, rtol=rtol,
                    clip=config.optim.clip_norm, normalization=args.normalization,
                    precision=precision)
    print(format_table(report))
    return 0 if report.passed else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, format_compare
    from .runfolder import check_out_dir, default_out_dir

    config = _config(args, own=("steps",), steps=args.compare_steps)
    out = Path(config.checkpoint.out) if config.checkpoint.out else default_out_dir("compare-")
    check_out_dir(out, config.checkpoint.overwrite)
    k = config.plan().accum_steps
    if k < 2:
        raise ConfigError("compare needs accum_steps of 2 or more to show a difference; "
                          "give e.g. --global-batch 32 --micro-batch 4")
    out.mkdir(parents=True, exist_ok=True)
    result = compare(config, steps=config.optim.steps, accum_steps=k,
                     out_png=out / "compare.png", log=lambda line: print(line, file=sys.stderr))
    table = format_compare(result)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    print(f"plot: {result.png}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .workload import build_workload, plan_workload

    if args.chosen:
        raise UsageError("bigbatch plan chooses the micro-batch and K itself; drop "
                         "--micro-batch and --accum-steps")
    config = _config(args, micro_batch="auto")
    candidates = None
    if args.candidates:
        try:
            candidates = [int(x) for x in args.candidates.split(",")]
        except ValueError:
            raise UsageError(f"--candidates needs sizes like 4,8,16, got {args.candidates!r}"
                             ) from None
    work = build_workload(config)
    choice = plan_workload(config, work, candidates=candidates, repeats=args.repeats)
    print(choice.table())
    print(choice.summary())
    print("train with: " + train_command(config, choice.plan.global_batch, choice.micro_batch)
          + "  (or --micro-batch auto)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .artifacts import export_run

    run = Path(args.run)
    target = Path(args.out) if args.out else run / ("merged" if args.merge else "export")
    print(f"wrote {export_run(run, target, merge=args.merge)}")
    return 0


def train_command(config: TrainConfig, global_batch: int, micro_batch: int) -> str:
    """``bigbatch train`` with the chosen sizes and every flag the plan was measured with that
    is not at its default (so what was measured is what trains)."""
    words = ["bigbatch", "train", "--global-batch", str(global_batch), "--micro-batch",
             str(micro_batch)]
    default = TrainConfig().flat()
    for key, value in config.flat().items():
        if key in PLAN_KEYS and key not in ("global_batch", "memory") and value != default[key]:
            if value is True:
                words.append(flag(key))
            elif value is False:
                words.append("--no-" + key.replace("_", "-"))
            else:
                words += [flag(key), str(value)]
    return " ".join(words)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bigbatch", description="Gradient accumulation done exactly.")
    sub = parser.add_subparsers(dest="command", metavar="{train,verify,compare,plan,export}",
                                parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train the default byte-level GPT (or on --data)",
                       description="Train a small byte-level GPT with exact gradient "
                       "accumulation; with no flags, on the Python standard library's source.")
    _add_config_flags(p)
    p.add_argument("--resume", metavar="DIR|auto", default=None,
                   help="continue the run in DIR from its newest good checkpoint (bitwise exact; "
                   "a run with no checkpoint yet starts from step 0), on the data it started "
                   "with; with --steps N, extend it to N steps (--schedule constant runs); "
                   "'auto' with --out and the "
                   "run's flags: continue the run in --out, or start it when there is none (the "
                   "same command line after every preemption)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("verify", help="check K micro-batches give the full-batch step",
                       description="From one starting state, take S optimizer steps with the "
                       "full batch in one pass and with K micro-batches through the engine; "
                       "print the differences and exit 1 if they exceed --rtol.")
    _add_config_flags(p, only=VERIFY_KEYS)
    own = p.add_argument_group("verify")
    own.add_argument("--steps", dest="verify_steps", metavar="S", type=_positive_int("--steps"),
                     default=3,
                     help="optimizer steps to compare (default 3)")
    own.add_argument("--rtol", type=_word(float, "rtol"), default=None,
                     help="relative tolerance (default 1e-10 for float64, 1e-4 for float32; "
                     "under --precision bf16 or fp16 that precision's, see the verdict line)")
    own.add_argument("--normalization", choices=("exact", "naive"), default="exact",
                     help="naive: divide each micro-batch's own mean by K (the 2024 bug), to see "
                     "it fail")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compare", help="loss curves: full batch vs bigbatch vs naive",
                       description="Train the same model and data three ways — full batch, "
                       "bigbatch accumulation, and the naive per-micro-batch mean — and plot them.")
    _add_config_flags(p, only=COMPARE_KEYS)
    own = p.add_argument_group("compare")
    own.add_argument("--steps", dest="compare_steps", metavar="S", type=_positive_int("--steps"),
                     default=40,
                     help="optimizer steps per run (default 40)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="choose the micro-batch (and K) for a memory budget",
                       description="Measure the default model's memory (probes of a forward and "
                       "backward), predict each candidate micro-batch's peak, time those that fit "
                       "the budget (--memory; default 80%% of free memory) and choose the fastest. "
                       "The global batch stays as given.")
    _add_config_flags(p, only=PLAN_KEYS)
    for name in ("--micro-batch", "--accum-steps"):  # refused with a reason, not "unrecognized"
        p.add_argument(name, dest="chosen", action="append", default=[], help=argparse.SUPPRESS)
    own = p.add_argument_group("plan")
    own.add_argument("--candidates", metavar="M,M,...", default=None,
                     help="micro-batch sizes to consider (default: every divisor of the global "
                     "batch)")
    own.add_argument("--repeats", type=_positive_int("--repeats"), default=3,
                     help="timed forward/backward passes per candidate (default 3)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write a run's Hugging Face model as a folder",
                       description="Write the model a run of --model PATH trained as a folder "
                       "that transformers loads: the fine-tuned model, or with --merge the base "
                       "model with the run's LoRA adapters folded into its weights.")
    p.add_argument("run", metavar="RUN", help="the run folder")
    p.add_argument("--merge", action="store_true",
                   help="fold LoRA adapters into the base weights (a plain model folder)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where to write (default: RUN/merged, or RUN/export); never overwritten")
    p.set_defaults(func=cmd_export)
    return parser


def _refuse_unknown(command: str, words: list[str]) -> NoReturn:
    """One line for flags the command does not take, naming those that belong to ``train``."""
    known = {flag(f.name) for _, cls, _ in GROUPS for f in dataclasses.fields(cls)}
    others = [w.split("=")[0] for w in words if w.split("=")[0] in known]
    if others and command != "train":
        raise UsageError(f"bigbatch {command} does not use {', '.join(others)} (bigbatch train "
                         f"does); drop {'it' if len(others) == 1 else 'them'}, see "
                         f"'bigbatch {command} --help'")
    raise UsageError(f"unrecognized arguments: {' '.join(words)}; see 'bigbatch {command} --help'")


def _positive_int(name: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} needs an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bigbatch`` command; returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            _refuse_unknown(args.command, extra)
        return args.func(args)
    except BigBatchError as e:
        rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
        who = "" if rank == "0" else f" (rank {rank})"
        print(f"bigbatch{who}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bigbatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
