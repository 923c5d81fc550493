"""DeepSpeed + ``ExactEngine`` against the full batch, float64, on CPU (gloo).

DeepSpeed's own engine (ZeRO stage 0, a client SGD optimizer with momentum, a per-step linear
schedule, ``gradient_clipping``) under ``torchrun`` with 1 and 2 processes, on padded rows of very
uneven length (``trainer_data``): micro-batches of 2 rows, K = 3, a short last cycle every epoch
(``last=True``), 2 epochs.

DeepSpeed computes the clipping norm in float32 (``runtime.utils.clip_grad_norm_`` casts each
gradient's norm with ``.float()``), so with clipping on its weights can only be compared with the
full batch to about 1e-7. Hence two exact checks: with clipping on, the gradient DeepSpeed is
handed at every step equals the full-batch gradient at the same weights (1e-10); with clipping
off, the weights equal full-batch training's (1e-10). The batch-triple helpers need no DeepSpeed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import trainer_data as td

from bigbatch import BatchPlan, BatchPlanError
from bigbatch.integrations import IntegrationError
from bigbatch.integrations.deepspeed import (
    ExactEngine,
    deepspeed_batch_config,
    plan_from_deepspeed_config,
)

CASES = ("exact", "exact-noclip", "default")


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def runs(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, list]]:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
    world, out = request.param, tmp_path_factory.mktemp(f"ds{request.param}")
    td.torchrun(Path(__file__).with_name("deepspeed_worker.py"), ",".join(CASES), out,
                world=world)
    return world, {c: [torch.load(out / f"{c}-rank{r}.pt") for r in range(world)]
                   for c in CASES}


def _full_gradient(params: list[torch.Tensor], rows: list[int]) -> list[torch.Tensor]:
    """∇ of the mean loss over ``rows`` at ``params``, plain PyTorch."""
    model = td.gpt2()
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    data = td.rows()
    td.lm_mean(model, td.collate([data[i] for i in rows])).backward()
    return [p.grad for p in model.parameters()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(td.flat(a) - td.flat(b))
                 / torch.linalg.vector_norm(td.flat(b)))


@pytest.mark.slow
@pytest.mark.distributed
def test_every_step_gets_the_full_batch_gradient(runs) -> None:
    world, got = runs
    steps = td.cycles(world)
    for r in got["exact"]:
        assert len(r["grads"]) == len(steps) == r["global_step"]
        for before, grad, rows in zip(r["before"], r["grads"], steps):
            assert _rel(grad, _full_gradient(before, rows)) <= td.RTOL
    if world == 2:
        seen = [sum(r["tokens"]) for r in got["exact"]]
        assert seen == [2 * t for t in td.per_rank_tokens(2, "row")] and seen[1] > 2 * seen[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_weights_match_full_batch(runs) -> None:
    world, got = runs
    start = td.gpt2()
    want, losses, _ = td.truth(start, world=world, clip=None)
    for r in got["exact-noclip"]:
        assert td.distance(r["params"], want, start) <= td.RTOL
        assert r["losses"] == pytest.approx(losses, rel=1e-12)
    clipped, clipped_losses, _ = td.truth(start, world=world)
    for r in got["exact"]:  # DeepSpeed's float32 clipping norm: close, not exact
        assert td.distance(r["params"], clipped, start) <= 1e-6
        assert r["losses"] == pytest.approx(clipped_losses, rel=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_negative_twin_engine_backward_alone_is_off(runs) -> None:
    """Mean loss per micro-batch through engine.backward (DeepSpeed divides by K) and its own
    boundary counter, which runs on across epochs: off by far more than the float32 clipping."""
    world, got = runs
    start = td.gpt2()
    want, _, _ = td.truth(start, world=world)
    for r in got["default"]:
        assert r["global_step"] < len(td.cycles(world))  # short cycles merged across epochs
        assert td.distance(r["params"], want, start) > 1e-3


# -- refusals and the batch triple ----------------------------------------------------------

class _Engine:
    """Stands in for a DeepSpeedEngine's configuration queries only."""

    def __init__(self, stage: int = 0, fp16: bool = False, managed: bool = True) -> None:
        self.stage, self.fp16, self.managed = stage, fp16, managed

    def set_gradient_accumulation_boundary(self, value: bool) -> None: ...

    def zero_optimization_stage(self) -> int:
        return self.stage

    def fp16_enabled(self) -> bool:
        return self.fp16

    def bfloat16_enabled(self) -> bool:
        return False

    def managed_gradient_accumulation(self) -> bool:
        return self.managed


def test_refuses_what_it_does_not_cover_naming_the_fix() -> None:
    with pytest.raises(IntegrationError, match="ZeRO stage 2 .* use stage 0"):
        ExactEngine(_Engine(stage=2))
    with pytest.raises(IntegrationError, match="fp16/bf16"):
        ExactEngine(_Engine(fp16=True))
    with pytest.raises(IntegrationError, match="managed_gradient_accumulation true"):
        ExactEngine(_Engine(managed=False))
    with pytest.raises(IntegrationError, match="DeepSpeedEngine from deepspeed.initialize"):
        ExactEngine(torch.nn.Linear(2, 2))
    ExactEngine(_Engine())  # stage 0, fp32: accepted


def test_batch_triple_round_trip_and_errors() -> None:
    plan = BatchPlan(global_batch=64, micro_batch=4, world_size=2)
    config = deepspeed_batch_config(plan)
    assert config == {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
                      "gradient_accumulation_steps": 8}
    assert plan_from_deepspeed_config(config, world_size=2) == plan
    # any two give the third, as in DeepSpeed; one alone means no accumulation
    assert plan_from_deepspeed_config({"train_batch_size": 64, "gradient_accumulation_steps": 8},
                                      world_size=2).micro_batch == 4
    assert plan_from_deepspeed_config({"train_micro_batch_size_per_gpu": 4},
                                      world_size=2).global_batch == 8
    with pytest.raises(BatchPlanError, match=r"global_batch 64 is not micro_batch 4 × "
                                             r"accum_steps 4 × world 2 = 32"):
        plan_from_deepspeed_config({**config, "gradient_accumulation_steps": 4}, world_size=2)
    with pytest.raises(BatchPlanError, match="'auto'.*resolve it"):
        plan_from_deepspeed_config({**config, "train_batch_size": "auto"}, world_size=2)
    with pytest.raises(BatchPlanError, match="none of train_batch_size"):
        plan_from_deepspeed_config({"zero_optimization": {"stage": 0}}, world_size=1)
