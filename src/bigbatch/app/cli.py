"""``bigbatch`` command line: ``train``, ``plan``, ``verify`` and ``compare``.

Each subcommand is a plain function. Flags are generated from :class:`~bigbatch.config.TrainConfig`
so the flags, config-file keys and the resolved ``config.yaml`` of a run share one set of names.
User mistakes print one line on stderr and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import BigBatchError
from .config import ConfigError, TrainConfig, load_config_file

__all__ = ["main"]

EXIT_USAGE = 2


class UsageError(BigBatchError):
    """A command-line mistake found by the argument parser."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, raised instead of printed with usage."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _number(kind: type, flag: str):
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} needs {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None

    return parse


def _micro_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--micro-batch needs an integer or auto, got {text!r}") from None


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or TOML file of the same keys as these flags (flags win)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f.metadata["help"],
                                  "dest": f.name}
        if kind == "bool":  # --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if f.name == "micro_batch":
                kwargs["type"] = _micro_batch
            elif "int" in kind:
                kwargs["type"] = _number(int, flag)
            elif "float" in kind:
                kwargs["type"] = _number(float, flag)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.name.upper() if "choices" not in f.metadata else None
        parser.add_argument(flag, **kwargs)


def _coerce_file_values(values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``1e-3`` as a string; accept numeric strings for float keys from files."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    out = dict(values)
    for key, value in values.items():
        if "float" in kinds.get(key, "") and isinstance(value, str):
            try:
                out[key] = float(value)
            except ValueError:
                pass  # TrainConfig names the bad value
    return out


def _config(args: argparse.Namespace, own: Sequence[str] = (), **defaults: Any) -> TrainConfig:
    """TrainConfig from defaults < config file < flags (subcommand-only flags left out)."""
    values: dict[str, Any] = dict(defaults)
    if "config" in args:
        values.update(_coerce_file_values(load_config_file(args.config)))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items()
                   if k in known and k not in own})
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .trainer import RunStopped, load_run_config, train

    if args.resume is not None:
        known = {f.name for f in dataclasses.fields(TrainConfig)} | {"config"}
        extra = sorted("--" + k.replace("_", "-") for k in vars(args) if k in known)
        if extra:
            raise UsageError(f"--resume continues a run with its own config.yaml; drop "
                             f"{', '.join(extra)}")
        config = load_run_config(Path(args.resume))
    else:
        config = _config(args)
    try:
        result = train(config, resume=args.resume is not None)
    except RunStopped as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            print(f"bigbatch: {stop}", file=sys.stderr)
        return stop.exit_code
    if not result.main:
        return 0
    print(f"final validation loss {result.final_val_loss:.4f} nats/byte "
          f"(uniform: 5.55); training loss {result.final_train_loss:.4f}; "
          f"{result.steps} steps in {result.seconds:.0f}s")
    print(f"run folder: {result.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from ..verify import default_rtol, format_table, verify
    from .verify import default_verify_inputs, factory_verify_inputs

    config = _config(args, own=("steps",), steps=args.verify_steps)
    plan = config.plan()
    if args.model:
        model, batches, loss_fn, make_opt = factory_verify_inputs(args.model, config)
    else:
        model, batches, loss_fn, make_opt = default_verify_inputs(config, config.steps)
    dtype = {"float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16}[config.dtype]
    rtol = args.rtol if args.rtol is not None else default_rtol(dtype)
    report = verify(model, batches, loss_fn, plan=plan, make_optimizer=make_opt, rtol=rtol,
                    clip=config.clip_norm, normalization=args.normalization)
    print(format_table(report))
    return 0 if report.passed else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .compare import compare, format_compare
    from .trainer import check_out_dir, default_out_dir

    config = _config(args, own=("steps",), steps=args.compare_steps)
    out = Path(config.out) if config.out else default_out_dir("compare-")
    check_out_dir(out, config.overwrite)
    k = config.plan().accum_steps
    if k < 2:
        raise ConfigError("compare needs accum_steps of 2 or more to show a difference; "
                          "give e.g. --global-batch 32 --micro-batch 4")
    out.mkdir(parents=True, exist_ok=True)
    result = compare(config, steps=config.steps, accum_steps=k, out_png=out / "compare.png",
                     log=lambda line: print(line, file=sys.stderr))
    table = format_compare(result)
    (out / "compare.md").write_text(table + "\n")
    print(table)
    print(f"plot: {result.png}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .trainer import plan_workload
    from .workload import build_workload

    given = [flag for flag, name in (("--micro-batch", "micro_batch"),
                                     ("--accum-steps", "accum_steps")) if name in vars(args)]
    if given:
        raise UsageError(f"bigbatch plan chooses the micro-batch and K itself; drop "
                         f"{' and '.join(given)}")
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
    chosen = replace(config, micro_batch=choice.micro_batch)
    print(f"train with: bigbatch train --global-batch {chosen.global_batch} "
          f"--micro-batch {choice.micro_batch}"
          + (" --checkpoint-activations" if config.checkpoint_activations else "")
          + "  (or --micro-batch auto)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bigbatch", description="Gradient accumulation done exactly.")
    sub = parser.add_subparsers(dest="command", metavar="{train,plan,verify,compare}",
                                parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train the default byte-level GPT (or on --data)",
                       description="Train a small byte-level GPT with exact gradient "
                       "accumulation; with no flags, on the Python standard library's source.")
    _add_config_flags(p)
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its newest good checkpoint (bitwise exact)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("verify", help="check K micro-batches give the full-batch step",
                       description="From one starting state, take S optimizer steps with the "
                       "full batch in one pass and with K micro-batches through the engine; "
                       "print the differences and exit 1 if they exceed --rtol.")
    _add_config_flags(p, skip=("steps",))
    p.add_argument("--steps", dest="verify_steps", type=_number(int, "--steps"), default=3,
                   help="optimizer steps to compare (default 3)")
    p.add_argument("--rtol", type=_number(float, "--rtol"), default=None,
                   help="relative tolerance (default 1e-10 for float64, float32 level otherwise)")
    p.add_argument("--model", metavar="MODULE:FACTORY", default=None,
                   help="your own setup: a function returning (model, batch, loss_fn)")
    p.add_argument("--normalization", choices=("exact", "naive"), default="exact",
                   help="naive: divide each micro-batch's own mean by K (the 2024 bug), to see "
                   "it fail")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compare", help="loss curves: full batch vs bigbatch vs naive",
                       description="Train the same model and data three ways — full batch, "
                       "bigbatch accumulation, and the naive per-micro-batch mean — and plot them.")
    _add_config_flags(p, skip=("steps",))
    p.add_argument("--steps", dest="compare_steps", type=_number(int, "--steps"), default=40,
                   help="optimizer steps per run (default 40)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="choose the micro-batch (and K) for a memory budget",
                       description="Measure the default model's memory (probes of a forward and "
                       "backward), predict each candidate micro-batch's peak, time those that fit "
                       "the budget (--memory; default 80%% of free memory) and choose the fastest. "
                       "The global batch stays as given.")
    _add_config_flags(p)
    p.add_argument("--candidates", metavar="M,M,...", default=None,
                   help="micro-batch sizes to consider (default: every divisor of the global "
                   "batch)")
    p.add_argument("--repeats", type=_number(int, "--repeats"), default=3,
                   help="timed forward/backward passes per candidate (default 3)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bigbatch`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        for name in ("verify_steps", "compare_steps", "repeats"):
            if getattr(args, name, 1) <= 0:
                raise ConfigError(f"--steps must be positive, got {getattr(args, name)}")
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
