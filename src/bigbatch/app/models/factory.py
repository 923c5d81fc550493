"""``module:function`` or ``path/file.py:function``: a user's own model, data and loss.

The function takes no arguments and returns ``(model, batch, loss_fn)``: an ``nn.Module``, a batch
(a tensor, or a dict/tuple/list of tensors with one row per sample) and
``loss_fn(model, batch) -> LossSum``. ``bigbatch verify --model`` compares the engine with the full
batch on it; ``bigbatch train --model`` trains on its rows (global batches drawn from them).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ...engine import LossFn
from ..config import ConfigError

__all__ = ["is_factory", "load_factory"]


def is_factory(spec: str) -> bool:
    """``MODULE:FUNCTION`` or ``file.py:FUNCTION`` (and not an existing folder)."""
    where, sep, name = spec.rpartition(":")
    return bool(sep and where and name) and not Path(spec).is_dir()


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
