"""``bigbatch verify``'s inputs: the default GPT on padded batches, or the user's own setup.

The comparison itself is the library's :func:`bigbatch.verify.verify`; this module builds what it
compares — the default workload's first global batches made variable-length, or the
``(model, batch, loss_fn)`` a ``--model module:function`` factory returns — and the optimizer.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..engine import LossFn
from .config import ConfigError, TrainConfig
from .data import global_batches, vary_lengths
from .workload import apply_batchnorm_option, build_workload, lm_loss

__all__ = ["default_verify_inputs", "factory_verify_inputs", "load_factory"]

MakeOptimizer = Callable[[torch.nn.Module], torch.optim.Optimizer]
VerifyInputs = tuple[torch.nn.Module, list[Any], LossFn, MakeOptimizer]


def load_factory(spec: str) -> tuple[torch.nn.Module, Any, LossFn]:
    """Import ``module:function`` (or ``path/file.py:function``) and call it.

    The function takes no arguments and returns ``(model, batch, loss_fn)``. A file is imported
    as a script would be: its folder is first on ``sys.path`` while it loads and while the
    function runs (so it can import its neighbours), and it is registered in ``sys.modules``
    under a private name (``dataclasses`` and pickling look modules up there).

    Raises:
        ConfigError: the spec, the import, the function or what it returns is wrong, or the
            function raised; the message names the problem and the fix in one line.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError(f"--model {spec!r}: expected MODULE:FUNCTION or path/file.py:FUNCTION")
    folder = None
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"--model {spec}: no such file {where}; check the path")
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)
    try:
        module = _import(spec, where)
        factory = getattr(module, name, None)
        if factory is None:
            raise ConfigError(f"--model {spec}: {where} has no attribute {name!r}; check the "
                              "function's name")
        if not callable(factory):
            raise ConfigError(f"--model {spec}: {name} is a {type(factory).__name__}, not "
                              "callable; name a function that returns (model, batch, loss_fn)")
        try:
            got = factory()
        except Exception as e:
            raise ConfigError(f"--model {spec} raised {type(e).__name__}: {e}") from None
    finally:
        if folder is not None and folder in sys.path:
            sys.path.remove(folder)
    if not (isinstance(got, tuple) and len(got) == 3 and isinstance(got[0], torch.nn.Module)
            and callable(got[2])):
        kinds = (f"({', '.join(type(x).__name__ for x in got)})" if isinstance(got, tuple)
                 else type(got).__name__)
        raise ConfigError(f"--model {spec}: {name}() must return (model, batch, loss_fn) with an "
                          f"nn.Module and a callable, got {kinds}")
    return got


def _import(spec: str, where: str) -> Any:
    """The module of a ``load_factory`` spec; import failures become one-line ConfigErrors."""
    try:
        if not where.endswith(".py"):
            return importlib.import_module(where)
        path = Path(where)
        # A private, identifier-only name: never shadows a real module, and importable by name.
        key = "_bigbatch_factory_" + re.sub(r"\W", "_", path.resolve().as_posix())
        mod_spec = importlib.util.spec_from_file_location(key, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError(f"--model {spec}: cannot load {where} as Python source")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[key] = module
        try:
            mod_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
        return module
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name is not None and (where == e.name or where.startswith(e.name + ".")):
            raise ConfigError(f"--model {spec}: no module named {e.name!r}; check PYTHONPATH "
                              "or give a file path (path/to/file.py:function)") from None
        raise ConfigError(f"--model {spec}: importing {where} raised ModuleNotFoundError: {e}; "
                          "install it or fix the import") from None
    except Exception as e:  # the user's module failed while importing
        raise ConfigError(f"--model {spec}: importing {where} raised {type(e).__name__}: {e}",
                          ) from None


def default_verify_inputs(config: TrainConfig, steps: int) -> VerifyInputs:
    """The default GPT and ``steps`` padded, variable-length global batches of the corpus.

    Batches are the training run's first ``steps`` global batches (:func:`global_batches`), each
    cut by :func:`vary_lengths` so micro-batch token counts differ, on the workload's device.

    Returns:
        ``(model, batches, lm_loss, make_optimizer)``; the optimizer is SGD with momentum at
        ``--lr`` (see :func:`_sgd` for why not AdamW).

    Raises:
        ConfigError, DataError: the device or the data cannot be had.
    """
    work = build_workload(config)
    plan = config.plan()
    order = global_batches(len(work.train), plan.global_batch, config.runtime.seed)
    seed = config.runtime.seed
    batches = [work.to_device(vary_lengths(work.train.batch(next(order)), seed, step))
               for step in range(steps)]
    return work.model, batches, lm_loss, _sgd(config.optim.lr)


def _sgd(lr: float) -> MakeOptimizer:
    """SGD with momentum: verify's optimizer, for the default model and for user factories.

    With SGD a parameter difference is proportional to the gradient difference, so it measures
    the accumulation. Adam divides each gradient element by its own magnitude: rounding noise in
    an element that is near zero becomes a step of size lr (measured on the default model in
    float32: gradients agree to ~1e-6 relative while AdamW parameters differ by ~5e-4).
    """

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)

    return make


def factory_verify_inputs(spec: str, config: TrainConfig) -> VerifyInputs:
    """A user's ``(model, batch, loss_fn)``: the batch repeated each step, SGD with momentum."""
    model, batch, loss_fn = load_factory(spec)
    dtype = {"float32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16}[config.model.dtype]
    model = apply_batchnorm_option(model.to(dtype), config.model.batchnorm)
    return model, [_cast_floats(batch, dtype)] * config.optim.steps, loss_fn, _sgd(config.optim.lr)


def _cast_floats(batch: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (nested) batch in ``dtype``; integer tensors and the rest unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_floats(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast_floats(v, dtype) for v in batch)
    return batch
