"""The independent full-batch reference for the JAX port's tests, and their model and data.

Nothing here uses ``bigbatch``: the reference concatenates the micro-batches of a cycle into one
batch, takes the token mean of the cross-entropy over its non-padding labels with plain
``jax.numpy``, differentiates it with ``jax.grad`` and applies one optax update. Call it with x64
enabled (``jax.enable_x64(True)``) for the float64 comparisons.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

VOCAB, SEQ, WIDTH, PAD = 13, 10, 8, -100


def init_params(seed: int = 0, dtype: Any = None) -> dict[str, jax.Array]:
    """A tiny causal token model: embedding, a causal running mean, a tanh layer, the output."""
    k = jax.random.split(jax.random.key(seed), 4)
    dtype = dtype or (jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    p = {"emb": jax.random.normal(k[0], (VOCAB, WIDTH)),
         "w": jax.random.normal(k[1], (WIDTH, WIDTH)) / WIDTH ** 0.5,
         "b": jax.random.normal(k[2], (WIDTH,)) * 0.1,
         "out": jax.random.normal(k[3], (WIDTH, VOCAB)) / WIDTH ** 0.5}
    return {name: v.astype(dtype) for name, v in p.items()}


def logits(params: dict[str, jax.Array], ids: jax.Array) -> jax.Array:
    h = params["emb"][ids]
    h = jnp.cumsum(h, axis=1) / jnp.arange(1, ids.shape[1] + 1, dtype=h.dtype)[None, :, None]
    return jnp.tanh(h @ params["w"] + params["b"]) @ params["out"]


def micro_batch(rng: np.random.Generator, lengths: Sequence[int]) -> dict[str, np.ndarray]:
    """Rows of random tokens; row r keeps ``lengths[r]`` labels, the rest is padding (-100)."""
    ids = rng.integers(0, VOCAB, (len(lengths), SEQ))
    labels = rng.integers(0, VOCAB, (len(lengths), SEQ))
    for row, n in enumerate(lengths):
        labels[row, n:] = PAD
    return {"ids": ids, "labels": labels}


def uneven_cycles(seed: int = 0, k: int = 4, rows: int = 4, n_cycles: int = 3,
                  last: int | None = None) -> list[list[dict[str, np.ndarray]]]:
    """Cycles of ``k`` micro-batches with very uneven token counts (one micro-batch of each cycle
    holds a single label, another is full); the last cycle holds ``last`` micro-batches."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_cycles):
        n = k if (last is None or c < n_cycles - 1) else last
        mbs = []
        for i in range(n):
            if i == 0:
                lengths = [1] + [0] * (rows - 1)
            elif i == 1:
                lengths = [SEQ] * rows
            else:
                lengths = list(rng.integers(0, SEQ + 1, rows))
            mbs.append(micro_batch(rng, lengths))
        out.append(mbs)
    return out


def token_mean_loss(params: dict[str, jax.Array], ids: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over every non-padding label of the batch."""
    logp = jax.nn.log_softmax(logits(params, ids), axis=-1)
    keep = labels != PAD
    nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.sum(keep)


OPTIMIZERS = {
    # clipping that is active on these gradients, AdamW under a decaying schedule
    "adamw": optax.chain(optax.clip_by_global_norm(0.05),
                         optax.adamw(optax.linear_schedule(3e-2, 3e-3, 3), weight_decay=0.1)),
    # no clipping and no normalizing optimizer: a wrong scale of the gradient shows too
    "sgd": optax.sgd(optax.linear_schedule(0.5, 0.1, 3), momentum=0.9),
}
OPTIMIZER = OPTIMIZERS["adamw"]


@functools.partial(jax.jit, static_argnames="name")
def full_batch_step(params: Any, state: Any, ids: np.ndarray, labels: np.ndarray,
                    name: str = "adamw") -> tuple[Any, Any]:
    """One optax step with ``jax.grad`` of the token-mean loss over the whole batch."""
    grads = jax.grad(token_mean_loss)(params, ids, labels)
    updates, state = OPTIMIZERS[name].update(grads, state, params)
    return optax.apply_updates(params, updates), state


def concat(mbs: Sequence[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """A cycle's micro-batches as one batch: ``(ids, labels)``."""
    return (np.concatenate([m["ids"] for m in mbs]), np.concatenate([m["labels"] for m in mbs]))


def full_batch_train(params: Any, cycles: Sequence[Sequence[dict[str, np.ndarray]]],
                     name: str = "adamw") -> Any:
    """One step of ``OPTIMIZERS[name]`` per cycle on the cycle's micro-batches as one batch."""
    state = OPTIMIZERS[name].init(params)
    for mbs in cycles:
        params, state = full_batch_step(params, state, *concat(mbs), name=name)
    return params


def update_error(got: Any, want: Any, start: Any) -> float:
    """Worst relative error of the update over the parameter arrays:
    max ‖got − want‖ / ‖want − start‖."""
    errs = jax.tree_util.tree_map(
        lambda g, w, s: float(jnp.linalg.norm((g - w).ravel()) / jnp.linalg.norm((w - s).ravel())),
        got, want, start)
    return max(jax.tree_util.tree_leaves(errs))
