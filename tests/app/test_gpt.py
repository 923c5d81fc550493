"""The byte-level GPT: shapes, causality, tied weights, dtypes, parameter count, validation."""

from __future__ import annotations

import pytest
import torch

from bigbatch.app.models.gpt import GPT, GPTConfig, num_parameters

SMALL = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, mlp_ratio=3)


def make(config: GPTConfig = SMALL, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_output_shape_and_dtype() -> None:
    model = make()
    ids = torch.randint(0, SMALL.vocab_size, (3, 11))
    logits = model(ids)
    assert logits.shape == (3, 11, SMALL.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_default_config_runs_at_full_length() -> None:
    model = make(GPTConfig())
    assert model(torch.randint(0, 256, (1, 128))).shape == (1, 128, 256)


@pytest.mark.parametrize("t", [0, 5, 15])
def test_causal_changing_a_token_leaves_earlier_positions_unchanged(t: int) -> None:
    model = make().to(torch.float64)
    ids = torch.randint(0, SMALL.vocab_size, (2, SMALL.seq_len))
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % SMALL.vocab_size
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
    # ...and the change is seen from position t on, so the check above is not vacuous.
    assert (a[:, t] - b[:, t]).abs().max() > 1e-6


def test_lm_head_is_tied_to_token_embedding() -> None:
    model = make()
    assert model.lm_head.weight is model.tok_emb.weight
    model.to(torch.float64)  # a dtype change must not untie them
    assert model.lm_head.weight is model.tok_emb.weight
    model(torch.randint(0, SMALL.vocab_size, (2, 8))).sum().backward()
    assert model.tok_emb.weight.grad is not None


def test_float64_forward_and_backward() -> None:
    model = make().to(torch.float64)
    logits = model(torch.randint(0, SMALL.vocab_size, (2, 9)))
    assert logits.dtype == torch.float64
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())


def test_float64_matches_float32() -> None:
    ids = torch.randint(0, SMALL.vocab_size, (2, 16))
    lo = make()(ids)
    hi = make().to(torch.float64)(ids)
    torch.testing.assert_close(lo.double(), hi, rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_runs() -> None:
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, SMALL.vocab_size, (2, 8)))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.tok_emb.weight.grad.dtype == torch.float32


def test_int32_ids_accepted() -> None:
    model = make()
    ids = torch.randint(0, SMALL.vocab_size, (2, 8))
    torch.testing.assert_close(model(ids.int()), model(ids))


def test_init_is_deterministic_and_follows_the_recipe() -> None:
    a, b = make(seed=3), make(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(make(seed=4).tok_emb.weight, a.tok_emb.weight)
    big = make(GPTConfig(n_layer=2, d_model=256, n_head=4))
    residual_std = 0.02 / (2 * 2) ** 0.5
    for block in big.blocks:
        assert block.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn_out.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.mlp_out.weight.std().item() == pytest.approx(residual_std, rel=0.05)
        assert block.qkv.bias is None
        assert torch.count_nonzero(block.mlp_out.bias) == 0
    assert big.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def expected_parameters(c: GPTConfig) -> int:
    d, h = c.d_model, c.mlp_ratio * c.d_model
    layer_norm = 2 * d
    block = (
        layer_norm
        + d * 3 * d  # qkv (no bias)
        + (d * d + d)  # attention output
        + layer_norm
        + (d * h + h)  # MLP in
        + (h * d + d)  # MLP out
    )
    # Embeddings, blocks, final LayerNorm; the tied head adds nothing.
    return c.vocab_size * d + c.seq_len * d + c.n_layer * block + layer_norm


@pytest.mark.parametrize("config", [SMALL, GPTConfig()])
def test_parameter_count_matches_formula(config: GPTConfig) -> None:
    model = make(config)
    assert num_parameters(model) == expected_parameters(config)
    # Counting the head separately would add vocab_size * d_model: the tie is counted once.
    every_tensor = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert every_tensor == num_parameters(model) + config.vocab_size * config.d_model


def test_dropout_modules_only_when_asked() -> None:
    assert not any(isinstance(m, torch.nn.Dropout) for m in make().modules())
    model = make(GPTConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=32, dropout=0.5))
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    ids = torch.randint(0, 64, (2, 16))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def test_too_long_input_raises() -> None:
    model = make()
    with pytest.raises(ValueError, match=r"input length 17 exceeds the model's seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "ids", [torch.zeros(8, dtype=torch.long), torch.zeros(1, 2, 8, dtype=torch.long)]
)
def test_non_2d_input_raises(ids: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="2-D"):
        make()(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_input_raises(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="integer token ids"):
        make()(torch.zeros(1, 4, dtype=dtype))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"d_model": 130},
            "d_model 130 is not divisible by n_head 4; pick d_model a multiple of n_head",
        ),
        ({"n_layer": 0}, "n_layer 0 is not a positive integer; give n_layer >= 1"),
        ({"vocab_size": -1}, "vocab_size -1 is not a positive integer"),
        ({"seq_len": 1.5}, "seq_len 1.5 is not a positive integer"),
        ({"n_head": True}, "n_head True is not a positive integer"),
        ({"dropout": 1.0}, "dropout 1.0 is outside [0, 1); give 0 <= dropout < 1"),
        ({"dropout": -0.1}, "dropout -0.1 is outside [0, 1)"),
        ({"dropout": "0.1"}, "dropout '0.1' is not a number"),
    ],
)
def test_config_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        GPTConfig(**kwargs)
    assert message in str(info.value)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SMALL.n_layer = 3  # type: ignore[misc]
