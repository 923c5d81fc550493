"""Choosing the micro-batch: the fastest that fits, and the budget holds in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bigbatch.planner as planner
from bigbatch import BatchPlanError, LossSum
from bigbatch.memory import MemoryBudgetError, MemoryProfile


def mlp_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 1))
    data = torch.randn(64, 32)

    def loss(m, x):
        return LossSum(m(x).square().sum(), x.shape[0])

    return model, loss, (lambda m: data[:m])


def fake_timings(seconds_per_call: dict[int, float]):
    def time_micro_batch(model, loss_fn, batch, *, repeats=3, autocast=None):
        return seconds_per_call[batch.shape[0]], batch.shape[0]
    return time_micro_batch


def test_the_fastest_fitting_size_wins_not_the_largest(monkeypatch) -> None:
    model, loss, make = mlp_setup()
    # per optimizer step (K × t): m=8 → 4 × 0.10 = 0.40 s, the fastest; m=16 → 2 × 0.25 = 0.50 s
    monkeypatch.setattr(planner, "time_micro_batch", fake_timings(
        {1: 0.1, 2: 0.1, 4: 0.1, 8: 0.10, 16: 0.25, 32: 0.6}))
    choice = planner.plan_micro_batch(model, loss, make, global_batch=32, world_size=1,
                                      budget="64GiB")
    assert (choice.micro_batch, choice.accum_steps) == (8, 4)
    assert [c.micro_batch for c in choice.candidates] == [1, 2, 4, 8, 16, 32]
    assert all(c.fits for c in choice.candidates)
    assert "| 8 ← | 4 |" in choice.table()
    assert choice.plan.global_batch == 32  # never changed


def test_near_ties_go_to_the_larger_size(monkeypatch) -> None:
    model, loss, make = mlp_setup()
    monkeypatch.setattr(planner, "time_micro_batch", fake_timings(
        {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.1245, 16: 0.25}))  # 8 is 0.4% faster per step than 16
    choice = planner.plan_micro_batch(model, loss, make, global_batch=32, world_size=1,
                                      budget="64GiB", candidates=[1, 2, 4, 8, 16])
    assert choice.micro_batch == 16


def test_sizes_over_budget_are_not_run(monkeypatch) -> None:
    model, loss, make = mlp_setup()
    calls: list[int] = []

    def timed(model, loss_fn, batch, *, repeats=3, autocast=None):
        calls.append(batch.shape[0])
        return 0.01 * batch.shape[0], batch.shape[0]

    def measured(*args, **kwargs):  # peak(m) = 1000 + 100 m bytes
        return MemoryProfile(device=torch.device("cpu"), held_bytes=1000, param_bytes=0,
                             grad_bytes=0, optimizer_bytes=0, optimizer_pending=0, fixed=0.0,
                             per_sample=100.0, saved_per_sample=80.0, measured=True)

    monkeypatch.setattr(planner, "time_micro_batch", timed)
    monkeypatch.setattr(planner, "measure_memory", measured)
    choice = planner.plan_micro_batch(model, loss, make, global_batch=32, world_size=1,
                                      budget=1000 + 650, margin=0.3)  # 650 = 5 × 100 × 1.3
    # (a size fits when held + (predicted − held) × (1 + margin) ≤ budget)
    assert choice.micro_batch == 4 and sorted(set(calls)) == [1, 2, 4]
    over = [c for c in choice.candidates if not c.fits]
    assert [c.micro_batch for c in over] == [8, 16, 32]
    assert all(c.note == "over budget" and c.seconds is None for c in over)
    assert choice.candidates[2].predicted_bytes == 1400


def test_impossible_budgets_and_sizes_are_clear_errors() -> None:
    model, loss, make = mlp_setup()
    with pytest.raises(MemoryBudgetError, match="even a micro-batch of 1 sample"):
        planner.plan_micro_batch(model, loss, make, global_batch=32, world_size=1, budget="1KiB")
    with pytest.raises(MemoryBudgetError, match=r"\[3\] do not divide the per-rank batch 16"):
        planner.plan_micro_batch(model, loss, make, global_batch=32, world_size=2,
                                 candidates=[2, 3])
    with pytest.raises(BatchPlanError, match="not divisible"):
        planner.plan_micro_batch(model, loss, make, global_batch=33, world_size=2)
    with pytest.raises(MemoryBudgetError, match="not a size"):
        planner.plan_micro_batch(model, loss, make, global_batch=32, budget="lots")


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from bigbatch import Accumulator
    from bigbatch.app.config import TrainConfig
    from bigbatch.app.data import global_batches
    from bigbatch.memory import PeakMeter, current_memory
    from bigbatch.app.workload import plan_workload
    from bigbatch.app.workload import build_workload, lm_loss, make_optimizer

    config = TrainConfig.of(global_batch=32, device="cpu", seed=0)
    work = build_workload(config)
    opt = make_optimizer(work.model, config)  # (the first optimizer imports torch._dynamo)
    acc = Accumulator(work.model, opt, clip_grad_norm=1.0)
    held = current_memory(work.device)
    budget = held + int(sys.argv[1])
    with PeakMeter(work.device) as meter:  # from here on: planning, then two training steps
        choice = plan_workload(TrainConfig.of(global_batch=32, device="cpu", memory=str(budget)),
                               work, repeats=1)
        batches = global_batches(len(work.train), 32, 0)
        for _ in range(2):
            acc.step(choice.plan.split(work.train.batch(next(batches))), lm_loss)
    print(json.dumps({"budget": budget, "peak": meter.peak, "micro": choice.micro_batch,
                      "predicted": {c.micro_batch: c.predicted_bytes
                                    for c in choice.candidates}}))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads Linux peak RSS")
def test_chosen_micro_batch_keeps_a_real_process_under_budget(tmp_path: Path) -> None:
    """A separate process, a budget 64 MiB above what it holds after loading: the planner's choice
    must leave room (the full global batch of 32 would not fit), and the process's peak resident
    set over planning and two training steps must stay within the budget."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script), str(64 * 2**20)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1 <= r["micro"] < 32
    assert r["predicted"]["32"] > r["budget"]  # the budget binds
    assert r["peak"] <= r["budget"], (r["peak"] - r["budget"]) / 2**20
