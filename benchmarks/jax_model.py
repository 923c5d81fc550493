"""The JAX benchmark's model, data and contenders (no bigbatch here but in ``bigbatch_*``).

A byte-level causal transformer in plain JAX (pre-norm blocks, tied embeddings), trained on rows
of random bytes with random amounts of padding (label -100), and the training steps compared:

* ``hand_scan_step``: the hand-written ``lax.scan`` accumulation most JAX code has — each
  micro-batch's own token mean, the gradients summed, divided by K, one optax update;
* ``multisteps_micro_step``: ``optax.MultiSteps``, one jitted call per micro-batch;
* ``full_step``: the whole global batch in one forward and backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PAD = -100


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    vocab: int = 256


FULL_SHAPE = Shape(n_layer=2, d_model=128, n_head=4, seq_len=128)
QUICK_SHAPE = Shape(n_layer=1, d_model=32, n_head=2, seq_len=16)


def init_params(shape: Shape, seed: int = 0, dtype: Any = jnp.float32) -> dict[str, Any]:
    d = shape.d_model
    keys = iter(jax.random.split(jax.random.key(seed), 2 + 4 * shape.n_layer))

    def dense(n_in: int, n_out: int) -> jax.Array:
        return (jax.random.normal(next(keys), (n_in, n_out)) * n_in ** -0.5).astype(dtype)

    blocks = [{"ln1": jnp.ones(d, dtype), "qkv": dense(d, 3 * d), "proj": dense(d, d),
               "ln2": jnp.ones(d, dtype), "fc1": dense(d, 4 * d), "fc2": dense(4 * d, d)}
              for _ in range(shape.n_layer)]
    return {"emb": (jax.random.normal(next(keys), (shape.vocab, d)) * 0.02).astype(dtype),
            "pos": (jax.random.normal(next(keys), (shape.seq_len, d)) * 0.02).astype(dtype),
            "blocks": blocks, "ln_f": jnp.ones(d, dtype)}


def _norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def logits(params: dict[str, Any], ids: jax.Array, n_head: int) -> jax.Array:
    b, t = ids.shape
    x = params["emb"][ids] + params["pos"][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for blk in params["blocks"]:
        q, k, v = jnp.split(_norm(x, blk["ln1"]) @ blk["qkv"], 3, axis=-1)
        q, k, v = (z.reshape(b, t, n_head, -1) for z in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        att = jax.nn.softmax(jnp.where(causal, att, -1e30), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, -1) @ blk["proj"]
        x = x + jax.nn.gelu(_norm(x, blk["ln2"]) @ blk["fc1"]) @ blk["fc2"]
    return _norm(x, params["ln_f"]) @ params["emb"].T


def nll_sum_count(params: Any, batch: dict[str, Any], n_head: int) -> tuple[Any, Any]:
    """Summed token cross-entropy over the non-padding labels, and their count."""
    logp = jax.nn.log_softmax(logits(params, batch["ids"], n_head), axis=-1)
    keep = batch["labels"] != PAD
    picked = jnp.take_along_axis(logp, jnp.where(keep, batch["labels"], 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(keep, picked, 0.0)), jnp.sum(keep)


def token_mean(params: Any, batch: dict[str, Any], n_head: int) -> jax.Array:
    total, count = nll_sum_count(params, batch, n_head)
    return total / count


def make_cycles(shape: Shape, k: int, micro: int, n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` cycles, each ``{"ids", "labels"}`` of shape ``[k, micro, seq_len]``; every row keeps
    a random number of labels (at least 1), the rest is padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, shape.vocab, (k, micro, shape.seq_len + 1))
        labels = ids[..., 1:].copy()
        keep = rng.integers(1, shape.seq_len + 1, (k, micro))
        labels[np.arange(shape.seq_len)[None, None, :] >= keep[..., None]] = PAD
        out.append({"ids": ids[..., :-1].astype(np.int32), "labels": labels.astype(np.int32)})
    return out


def hand_scan_step(optimizer: optax.GradientTransformation, n_head: int) -> Any:
    """The usual hand-written accumulation: ``lax.scan`` of each micro-batch's mean-loss
    gradient, summed, divided by K, one optax update."""
    def step(params: Any, state: Any, cycle: dict[str, Any]) -> tuple[Any, Any, Any]:
        k = jax.tree_util.tree_leaves(cycle)[0].shape[0]

        def body(carry: Any, batch: Any) -> tuple[Any, None]:
            acc, loss = carry
            value, grads = jax.value_and_grad(token_mean)(params, batch, n_head)
            return (jax.tree_util.tree_map(jnp.add, acc, grads), loss + value), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (acc, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros(())), cycle)
        grads = jax.tree_util.tree_map(lambda g: g / k, acc)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss / k
    return jax.jit(step, donate_argnums=(0, 1))


def multisteps_micro_step(multi: optax.GradientTransformation, n_head: int) -> Any:
    """One micro-batch through ``optax.MultiSteps`` (call it K times per optimizer step)."""
    def step(params: Any, state: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(token_mean)(params, batch, n_head)
        updates, state = multi.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss
    return jax.jit(step, donate_argnums=(0, 1))


def full_step(optimizer: optax.GradientTransformation, n_head: int) -> Any:
    """The whole global batch at once: the token mean over all of it, one optax update."""
    def step(params: Any, state: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(token_mean)(params, batch, n_head)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss
    return jax.jit(step, donate_argnums=(0, 1))


def flatten(cycle: dict[str, Any]) -> dict[str, Any]:
    """``[K, micro, ...]`` → ``[K·micro, ...]``: the cycle as one batch."""
    return {key: v.reshape(-1, *v.shape[2:]) for key, v in cycle.items()}
