"""Measuring memory: saved-activation bytes against an analytic count, the fitted line, sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bigbatch import LossSum
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.loss import token_cross_entropy
from bigbatch.memory import (
    MemoryBudgetError,
    PeakMeter,
    format_bytes,
    measure_memory,
    optimizer_state_bytes,
    parse_bytes,
    saved_activation_bytes,
)

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("text,expected", [
    ("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("2k", 2000),
    ("1073741824", 2**30), (" 3 kib ", 3072), (4096, 4096)])
def test_sizes_are_read(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "eight GiB", "8 parsecs", "0", "-1GiB", "0.1B"])
def test_bad_sizes_are_refused(bad) -> None:
    with pytest.raises(MemoryBudgetError, match="size"):
        parse_bytes(bad)


def test_sizes_are_printed_in_binary_units() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"


def linear_stack(widths: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b, bias=False), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])  # no activation after the last layer


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_saved_bytes_of_a_linear_stack_are_the_analytic_count(batch: int) -> None:
    """Autograd keeps, per sample: the input (for the first weight's gradient), each tanh's output
    (for tanh's derivative, and as the next layer's input: one storage), and the output (for the
    square). Weights are parameters and are not counted. In float64, 8 bytes a value."""
    widths = [5, 7, 11, 3]
    model = linear_stack(widths)
    x = torch.randn(batch, widths[0])
    saved = saved_activation_bytes(model, lambda: (model(x) ** 2).sum())
    assert saved == batch * sum(widths) * 8
    # the same stack with a biased first layer keeps exactly the same tensors (a bias's gradient
    # is a sum over the batch: nothing more is saved for it)
    biased = linear_stack(widths)
    biased[0] = torch.nn.Linear(widths[0], widths[1], bias=True)
    assert biased[0].bias is not None
    assert saved_activation_bytes(biased, lambda: (biased(x) ** 2).sum()) == saved
    # the count sees what is saved: a sine after the output keeps its input, one more tensor
    more = saved_activation_bytes(model, lambda: (torch.sin(model(x)) ** 2).sum())
    assert more == saved + batch * widths[-1] * 8


def lm(model: torch.nn.Module, batch: torch.Tensor) -> LossSum:
    return token_cross_entropy(model(batch[:, :-1]), batch[:, 1:])


def test_saved_bytes_of_the_default_gpt_are_linear_in_the_batch() -> None:
    """The default model as ``bigbatch train`` runs it (float32; in float64 the CPU attention
    kernel keeps a few bytes that do not scale with the batch)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig()).float()
    data = torch.randint(0, 256, (16, 129))

    def loss(b: int) -> torch.Tensor:  # fresh, contiguous tensors for every batch size
        ids, labels = data[:b, :-1].contiguous(), data[:b, 1:].contiguous()
        return token_cross_entropy(model(ids), labels).sum

    saved = {b: saved_activation_bytes(model, lambda b=b: loss(b)) for b in (1, 2, 4, 8, 16)}
    per = (saved[4] - saved[2]) // 2
    assert per > 0
    assert saved[8] - saved[4] == 4 * per and saved[16] - saved[8] == 8 * per
    # one row is laid out contiguously where more rows are not (a few KiB of copies fewer)
    assert saved[1] == pytest.approx(saved[2] - per, rel=5e-3)
    # every block keeps at least its d_model-wide input per token: a floor on the slope
    assert per >= 4 * 128 * 128 * 4


def test_checkpointing_keeps_the_gradient_and_saves_less() -> None:
    data = torch.randint(0, 256, (4, 33))
    grads, saved = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(seq_len=32, n_layer=3, d_model=32, n_head=2,
                              checkpoint_activations=on))
        lm(model, data).sum.backward()
        grads[on] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        saved[on] = saved_activation_bytes(model, lambda m=model: lm(m, data).sum)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert saved[True] < saved[False] / 3


def test_measuring_changes_nothing() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randn(16, 6)
    rng = torch.get_rng_state()

    def loss(m, x):
        return LossSum(m(x).square().sum(), x.shape[0])

    profile = measure_memory(model, loss, lambda m: data[:m], optimizer=opt, sizes=(2, 4, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert not opt.state
    n_params = sum(p.numel() for p in model.parameters())
    assert profile.param_bytes == profile.grad_bytes == 8 * n_params
    assert profile.optimizer_pending == 2 * 8 * n_params  # AdamW: two slots, not yet allocated
    assert [p.micro_batch for p in profile.probes] == [2, 4, 8]
    assert profile.predict(16) > profile.predict(8) >= profile.held_bytes


def test_measuring_refuses_what_it_cannot_do() -> None:
    model = torch.nn.Linear(3, 1)
    loss = lambda m, x: LossSum(m(x).sum(), 1)  # noqa: E731
    with pytest.raises(MemoryBudgetError, match="two or more"):
        measure_memory(model, loss, lambda m: torch.randn(m, 3), sizes=(4,))
    loss(model, torch.randn(2, 3)).sum.backward()
    with pytest.raises(MemoryBudgetError, match="holds gradients"):
        measure_memory(model, loss, lambda m: torch.randn(m, 3))


def test_optimizer_state_is_counted_once_it_exists() -> None:
    model = torch.nn.Linear(10, 10)
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert optimizer_state_bytes(sgd, params) == (110 * 8, 110 * 8)  # 110 float64 values
    adam = torch.optim.Adam(params)
    model(torch.randn(2, 10)).sum().backward()
    adam.step()
    held, pending = optimizer_state_bytes(adam, params)
    assert (held, pending) == (2 * 110 * 8, 0)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="CPU peaks are read from Linux's /proc/self")
def test_peak_meter_sees_an_allocation() -> None:
    with PeakMeter(torch.device("cpu")) as meter:
        x = torch.ones(8 * 2**20, dtype=torch.uint8)
        x += 1  # touch every page
        del x
    assert meter.increase is not None and meter.increase >= 7 * 2**20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_peak_covers_the_saved_activations() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=64, n_layer=2, d_model=64, n_head=2)).cuda()
    data = torch.randint(0, 256, (16, 65), device="cuda")
    profile = measure_memory(model, lm, lambda m: data[:m], sizes=(2, 4, 8))
    assert profile.measured
    for probe in profile.probes:  # the allocator's peak holds at least what autograd saved
        assert probe.peak_bytes >= probe.saved_bytes
