"""A small byte-level GPT: the model that ``bigbatch train`` uses to show exact accumulation.

Pre-LayerNorm transformer blocks with causal self-attention (through
:func:`torch.nn.functional.scaled_dot_product_attention`), learned positions and an output head
tied to the token embedding. It runs in float32, float64 and under bfloat16 autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...rows import segment_ids

__all__ = ["GPT", "GPTConfig", "document_mask", "document_spans", "num_parameters"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (256 for bytes).
        seq_len: longest input the model accepts (size of the positional table).
        n_layer: number of transformer blocks.
        n_head: attention heads per block; must divide ``d_model``.
        d_model: width of the residual stream.
        mlp_ratio: hidden width of each MLP, as a multiple of ``d_model``.
        dropout: dropout probability in ``[0, 1)``; 0 builds no dropout at all.
        checkpoint_activations: keep only each block's input for backward and recompute the
            block's activations there (``torch.utils.checkpoint``, non-reentrant): activation
            memory falls from about ``n_layer × (17 d_model + 2 n_head T) × T`` values per sample to
            ``n_layer × d_model × T`` plus one block's, for about one more forward of compute.
            The result is the same (dropout masks are replayed).

    Raises:
        ValueError: a field is out of range; the message names the value and the fix.
    """

    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "mlp_ratio"):
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} is not a positive integer; give {name} >= 1")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model {self.d_model} is not divisible by n_head {self.n_head}; "
                f"pick d_model a multiple of n_head"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout {self.dropout!r} is not a number; give 0 <= dropout < 1")
        if not isinstance(self.checkpoint_activations, bool):
            raise ValueError(f"checkpoint_activations {self.checkpoint_activations!r} must be "
                             "True or False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout!r} is outside [0, 1); give 0 <= dropout < 1")


class _Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.ln_1 = nn.LayerNorm(d)
        # No bias on q/k/v: a key bias cannot change attention (softmax ignores a shift shared by
        # all keys), so its gradient is identically zero and Adam would only amplify rounding noise.
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, cfg.mlp_ratio * d)
        self.mlp_out = nn.Linear(cfg.mlp_ratio * d, d)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        # SDPA wants (batch, heads, time, head_dim).
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        if docs is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        elif isinstance(docs, torch.Tensor):  # a block-diagonal causal mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=docs, dropout_p=p)
        else:  # each sample on its own: (row, start, length) spans
            y = torch.stack([torch.cat([
                F.scaled_dot_product_attention(q[r:r + 1, :, o:o + n], k[r:r + 1, :, o:o + n],
                                               v[r:r + 1, :, o:o + n], dropout_p=p,
                                               is_causal=True)[0]
                for o, n in spans], dim=1) for r, spans in enumerate(docs)])
        x = x + self.drop(self.attn_out(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp_out(F.gelu(self.mlp_in(self.ln_2(x)))))


class GPT(nn.Module):
    """Causal language model over ``config.vocab_size`` tokens.

    Initialization draws from the global torch RNG only, so ``torch.manual_seed(s)`` before
    construction makes the weights reproducible.

    Args:
        config: the model's shape; defaults to ``GPTConfig()``.
    """

    def __init__(self, config: GPTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else GPTConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one tensor, one gradient
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Each block adds two outputs to the residual stream; shrinking them keeps the stream's
        # variance from growing with depth at initialization.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn_out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp_out.weight, mean=0.0, std=residual_std)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Next-token logits for every position.

        Args:
            input_ids: integer tensor of shape ``[B, T]`` with ``T <= config.seq_len`` and ids in
                ``[0, vocab_size)``.
            position_ids: ``[B, T]`` positions for padding-free rows (:func:`bigbatch.pack_rows`):
                several samples per row, each restarting at 0. Attention then stays within a
                sample (a block-diagonal causal mask from the restarts), so each sample's logits
                are those it gets alone. ``None``: positions ``0..T-1``, one sample per row.

        Returns:
            Float tensor ``[B, T, vocab_size]``; position ``t`` depends only on ids ``0..t`` (of
            its own sample, with ``position_ids``).

        Raises:
            ValueError: ``input_ids`` is not a 2-D integer tensor, ``T > config.seq_len``, or
                ``position_ids`` is not an integer tensor of the same shape with values in
                ``[0, seq_len)``.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
            raise ValueError(
                f"input_ids must be a 2-D [batch, time] tensor, got shape {shape}; "
                f"add a batch dimension with input_ids.unsqueeze(0)"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; "
                f"convert with input_ids.long()"
            )
        t = input_ids.shape[1]
        if t > self.config.seq_len:
            raise ValueError(
                f"input length {t} exceeds the model's seq_len {self.config.seq_len}; "
                f"cut the input to at most {self.config.seq_len} tokens or build a larger seq_len"
            )
        ids = input_ids.long()
        docs: Documents | None = None
        if position_ids is None:
            positions = torch.arange(t, device=ids.device)
        else:
            positions = self._check_positions(position_ids, input_ids.shape)
            # CPU: one attention call per sample (2.5× faster than one dense masked call over
            # 1024-column rows of 9 samples: benchmarks/attention_rows.py); CUDA: one masked
            # call (no per-sample launches)
            docs = document_mask(positions) if ids.is_cuda else document_spans(positions)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        recompute = self.config.checkpoint_activations and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, docs, use_reentrant=False) if recompute else block(x, docs)
        return self.lm_head(self.ln_f(x))

    def _check_positions(self, position_ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape != shape or (
                position_ids.is_floating_point() or position_ids.dtype == torch.bool):
            got = (f"{position_ids.dtype} {tuple(position_ids.shape)}"
                   if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__)
            raise ValueError(f"position_ids must be an integer tensor of shape {tuple(shape)} "
                             f"(as input_ids), got {got}; build rows with bigbatch.pack_rows")
        positions = position_ids.long()
        if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < \
                self.config.seq_len:
            raise ValueError(f"position_ids must lie in [0, {self.config.seq_len}) (the model's "
                             f"seq_len), got [{int(positions.min())}, {int(positions.max())}]")
        return positions


Documents = torch.Tensor | list[list[tuple[int, int]]]  # a mask, or each row's sample spans


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's samples as ``(start, length)`` spans: a new sample wherever ``position_ids``
    does not continue by 1 (``[[0, 1, 2, 0, 1]] -> [[(0, 3), (3, 2)]]``)."""
    seg = segment_ids(position_ids).tolist()
    out = []
    for row in seg:
        spans: list[tuple[int, int]] = []
        for i, s in enumerate(row):
            if i == 0 or s != row[i - 1]:
                spans.append((i, 1))
            else:
                spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        out.append(spans)
    return out


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` boolean attention mask of padding-free rows: query ``q`` sees key ``k``
    when ``k <= q`` and both lie in the same sample (a new sample wherever ``position_ids`` does
    not continue by 1, see :func:`bigbatch.rows.segment_ids`)."""
    seg = segment_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal).unsqueeze(1)


def num_parameters(model: nn.Module) -> int:
    """Count a module's trainable and frozen parameters, each shared tensor once (an FSDP2
    shard counts at its full size).

    Args:
        model: any module; for :class:`GPT` the tied head/embedding weight counts once.

    Returns:
        Total number of scalar parameters.
    """
    # parameters() already skips repeats; deduplicating by identity keeps the promise explicit.
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in unique.values())
