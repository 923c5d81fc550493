"""Out of memory in the middle of a cycle: the micro-batch is split and the step stays exact.

Faults are injected by a layer that raises ``torch.OutOfMemoryError`` when it sees more rows than
allowed — in the forward, or in the backward after the layers above it have already added their
gradient — and the final weights are compared in float64 with an independent full-batch run.
"""

from __future__ import annotations

import pytest
import torch
from reference import RTOL, FaultyLM, full_batch_train, lm_batch, lm_mean_loss, max_rel_diff

from bigbatch import Accumulator, LossSum, token_cross_entropy
from bigbatch.memory import OutOfMemory, is_out_of_memory

pytestmark = pytest.mark.usefixtures("float64")


def lm_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)


def cycles(steps: int = 4, k: int = 3, micro: int = 4) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(3)
    return [[lm_batch(micro, generator=g) for _ in range(k)] for _ in range(steps)]


def run(model: FaultyLM, data, *, clip: float | None = 0.7, **acc_kw) -> list:
    acc = Accumulator(model, sgd(model), clip_grad_norm=clip, **acc_kw)
    return [acc.step(cycle, lm_sum) for cycle in data]


def truth(data, clip: float | None = 0.7) -> torch.nn.Module:
    return full_batch_train(FaultyLM(), sgd, data, lm_mean_loss, clip=clip)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_oom_mid_cycle_splits_and_stays_exact(where: str) -> None:
    data = cycles()
    model = FaultyLM()
    model.limits[where] = 2  # micro-batches of 4 rows fail; halves of 2 fit
    stats = run(model, data)
    assert model.limits["raised"] >= 1
    assert stats[0].oom_splits == 1 and stats[0].max_rows == 2
    assert all(s.oom_splits == 0 for s in stats[1:])  # later micro-batches run in pieces of 2
    assert max_rel_diff(model, truth(data)) <= RTOL


def test_oom_on_a_later_micro_batch_keeps_the_accumulated_gradient() -> None:
    data = cycles()
    model = FaultyLM()

    calls = {"n": 0}

    def loss_fn(m, batch):  # from the third micro-batch of the second cycle: 1 row at most
        calls["n"] += 1  # (calls 6 to 12: the 4 rows, two halves of 2, four quarters of 1)
        m.limits["backward"] = 1 if 6 <= calls["n"] <= 12 else 10**9
        return lm_sum(m, batch)

    acc = Accumulator(model, sgd(model), clip_grad_norm=0.7)
    stats = [acc.step(cycle, loss_fn) for cycle in data]
    assert [s.oom_splits for s in stats] == [0, 3, 0, 0]  # 4 → 2+2 → (1+1)+(1+1)
    assert model.limits["raised"] == 3
    assert max_rel_diff(model, truth(data)) <= RTOL


def test_redoing_parameters_the_failed_backward_reached_would_be_wrong(monkeypatch) -> None:
    """The negative case: a retry that lets the halves add their gradient to the parameters the
    failed backward had already reached (here, the head) counts that gradient twice."""
    data = cycles()
    model = FaultyLM()
    model.limits["backward"] = 2
    acc = Accumulator(model, sgd(model), clip_grad_norm=None)
    # the runner no longer knows which parameters the failed backward reached
    monkeypatch.setattr(acc.runner, "reached", lambda: [])
    for cycle in data:
        acc.step(cycle, lm_sum)
    assert max_rel_diff(model, truth(data, clip=None)) > 1e-3


def test_split_size_grows_back_after_clean_steps() -> None:
    model = FaultyLM()
    model.limits["forward"] = 2
    acc = Accumulator(model, sgd(model), oom_regrow_after=2)
    data = cycles(steps=6)
    stats = [acc.step(c, lm_sum) for c in data[:3]]
    assert [s.max_rows for s in stats] == [2, 2, None]  # two clean steps: whole again
    model.limits["forward"] = 10**9
    assert acc.step(data[3], lm_sum).max_rows is None
    model.limits["forward"] = 2  # fails again after growing: waits twice as long next time
    stats = [acc.step(c, lm_sum) for c in data[4:]]
    assert [s.oom_splits for s in stats] == [1, 0] and acc.runner.regrow_every == 4


def test_one_row_that_does_not_fit_is_a_clear_error() -> None:
    model = FaultyLM()
    model.limits["forward"] = 0
    acc = Accumulator(model, sgd(model))
    with pytest.raises(OutOfMemory, match="cannot be split further"):
        acc.step(cycles(steps=1)[0], lm_sum)
    assert all(p.grad is None for p in model.parameters())  # the cycle was discarded
    assert all(p.requires_grad for p in model.parameters())


def test_raise_mode_and_other_errors_propagate() -> None:
    model = FaultyLM()
    model.limits["forward"] = 2
    with pytest.raises(torch.OutOfMemoryError):
        run(model, cycles(steps=1), oom="raise")

    def broken(m, batch):
        raise RuntimeError("shape mismatch, not memory")

    acc = Accumulator(FaultyLM(), sgd(FaultyLM()))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        acc.step(cycles(steps=1)[0], broken)


def test_cpu_allocator_failure_is_recognized() -> None:
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert is_out_of_memory(info.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_noise_scale_is_dropped_for_a_cycle_whose_backward_failed() -> None:
    model = FaultyLM()
    model.limits["backward"] = 2
    acc = Accumulator(model, sgd(model), noise_scale=True)
    stats = [acc.step(c, lm_sum) for c in cycles(steps=2)]
    assert stats[0].noise is None and stats[1].noise is not None


def test_split_state_survives_state_dict() -> None:
    model = FaultyLM()
    model.limits["forward"] = 2
    acc = Accumulator(model, sgd(model))
    acc.step(cycles(steps=1)[0], lm_sum)
    other = Accumulator(FaultyLM(), sgd(FaultyLM()))
    other.load_state_dict(acc.state_dict())
    assert other.max_rows == 2
