"""Finding and switching off dropout, for comparisons that need a deterministic forward.

A model in training mode with dropout draws a fresh mask at every forward: one pass over the full
batch and K passes over its micro-batches draw different masks, so their gradients differ by the
dropout noise itself (relative differences of order 1 at p = 0.1), not by anything accumulation
does. :func:`bigbatch.verify.verify` therefore compares with dropout off, in copies of the model.

What counts as dropout, on modules in training mode (found by name and type; no framework is
imported):

- the ``torch.nn`` dropout modules (``Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
  ``FeatureAlphaDropout``) with ``p > 0``;
- float attributes a forward reads as a probability: ``dropout`` (``nn.MultiheadAttention``,
  ``nn.LSTM``), ``attention_dropout`` (Hugging Face Llama and most attention modules),
  ``drop_prob`` / ``drop_path`` (stochastic depth) — any attribute whose name holds ``dropout``,
  ``pdrop``, ``drop_prob``, ``drop_path`` or ``layerdrop``;
- the same names in a Hugging Face ``model.config`` (``attn_pdrop``, ``hidden_dropout_prob``,
  ``layerdrop``, …), which some models read at every forward.

Each is set to 0, which makes dropout the identity without drawing random numbers. Randomness of
any other kind is not found here; :func:`bigbatch.verify.verify` detects it by its effect.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["switch_off_dropout"]

_NAMES = ("dropout", "pdrop", "drop_prob", "drop_path", "layerdrop")
_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
            torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def _probabilities(obj: Any) -> list[str]:
    """Names of ``obj``'s own float attributes that look like a dropout probability above 0."""
    return sorted(name for name, value in getattr(obj, "__dict__", {}).items()
                  if any(n in name.lower() for n in _NAMES)
                  and isinstance(value, float) and value > 0)


def switch_off_dropout(model: torch.nn.Module) -> list[str]:
    """Set every active dropout probability of ``model`` (in training mode) to 0, in place.

    Args:
        model: the module to change (give a copy to keep the original).

    Returns:
        What was switched off, one short description per kind (empty when nothing was active),
        e.g. ``["25 Dropout modules (p=0.1)", "config attn_pdrop, embd_pdrop, resid_pdrop"]``.
    """
    modules: dict[str, list[float]] = {}
    attrs: dict[str, list[float]] = {}
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, _DROPOUT) and module.p > 0:
            modules.setdefault(type(module).__name__, []).append(module.p)
            module.p = 0.0
            continue
        for name in _probabilities(module):
            attrs.setdefault(f"{type(module).__name__}.{name}", []).append(getattr(module, name))
            setattr(module, name, 0.0)
    found = [f"{len(ps)} {kind} module{'s' if len(ps) > 1 else ''} (p={_values(ps)})"
             for kind, ps in sorted(modules.items())]
    found += [f"{len(ps)}× {name}={_values(ps)}" if len(ps) > 1 else f"{name}={_values(ps)}"
              for name, ps in sorted(attrs.items())]
    config = getattr(model, "config", None)
    names = _probabilities(config) if model.training and config is not None else []
    for name in names:
        setattr(config, name, 0.0)
    if names:
        found.append(f"config {', '.join(names)}")
    return found


def _values(ps: list[float]) -> str:
    distinct = sorted(set(ps))
    return f"{distinct[0]:g}" if len(distinct) == 1 else f"{distinct[0]:g}–{distinct[-1]:g}"
