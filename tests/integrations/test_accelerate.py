"""Accelerate + ``ExactAccumulation`` against the full batch, float64.

The loop the Accelerate docs show (``accumulate()``, ``backward``, ``clip_grad_norm_`` on
``sync_gradients``, optimizer, scheduler, ``zero_grad``) on padded rows of very uneven length
(``trainer_data``): micro-batches of 2 rows, K = 3, a short last cycle every epoch, SGD with
momentum, clipping active on some steps, a linear schedule, 2 epochs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")

import accelerate_worker  # noqa: E402
import trainer_data as td  # noqa: E402

from bigbatch import LossError  # noqa: E402
from bigbatch.integrations import IntegrationError  # noqa: E402


@pytest.fixture(scope="module")
def start() -> torch.nn.Module:
    return td.gpt2()


@pytest.fixture(scope="module")
def full(start: torch.nn.Module) -> tuple[torch.nn.Module, list[float], list[float]]:
    return td.truth(start)


@pytest.mark.slow
def test_exact_accumulation_matches_full_batch(start, full) -> None:
    want, losses, norms = full
    got = accelerate_worker.train("exact")
    assert td.distance(got["params"], want, start) <= td.RTOL
    assert got["losses"] == pytest.approx(losses, rel=1e-12)  # exact.loss, once per step
    assert got["grad_norms"] == pytest.approx(norms, rel=1e-10)


@pytest.mark.slow
def test_negative_twin_documented_loop_is_off(start, full) -> None:
    want, _, norms = full
    got = accelerate_worker.train("default")
    assert td.distance(got["params"], want, start) > 1e-3
    assert got["grad_norms"] != pytest.approx(norms, rel=1e-3)


@pytest.mark.slow
def test_save_state_and_resume_is_the_same_run(tmp_path: Path) -> None:
    whole = accelerate_worker.train("exact")
    accelerate_worker.train("exact", epochs=1, save=tmp_path / "state")
    resumed = accelerate_worker.train("exact", first_epoch=1, load=tmp_path / "state")
    assert all(torch.equal(a, b) for a, b in zip(whole["params"], resumed["params"]))


@pytest.mark.slow
def test_bf16_autocast_runs_and_stays_near_the_full_batch(start, full) -> None:
    from accelerate.state import AcceleratorState, GradientState

    want, _, _ = full
    got = {}
    for case in ("exact", "default"):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        got[case] = td.distance(accelerate_worker.train(
            case, model=td.gpt2().float(), mixed_precision="bf16")["params"], want, start)
    assert got["exact"] < got["default"] / 10, got


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_match_full_batch(start, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes: every other micro-batch per process, fewer tokens on rank 0;
    the documented loop unchanged in the same processes: off."""
    td.torchrun(Path(accelerate_worker.__file__), "exact,default", tmp_path)
    want, losses, norms = td.truth(start, world=2)
    ranks = {case: [torch.load(tmp_path / f"{case}-rank{r}.pt") for r in (0, 1)]
             for case in ("exact", "default")}
    seen = [sum(r["tokens"]) for r in ranks["exact"]]
    assert seen == [2 * t for t in td.per_rank_tokens(2, "batch")] and seen[1] > 1.3 * seen[0]
    for r in ranks["exact"]:
        assert td.distance(r["params"], want, start) <= td.RTOL
        assert r["losses"] == pytest.approx(losses, rel=1e-12)
        assert r["grad_norms"] == pytest.approx(norms, rel=1e-10)
    for r in ranks["default"]:
        assert td.distance(r["params"], want, start) > 1e-3


# -- refusals ---------------------------------------------------------------------------------

def test_a_bare_mean_loss_is_refused_naming_the_fix() -> None:
    from accelerate import Accelerator

    from bigbatch.integrations.accelerate import ExactAccumulation

    model = torch.nn.Linear(2, 1)
    exact = ExactAccumulation(Accelerator(cpu=True, gradient_accumulation_steps=2), model)
    with pytest.raises(LossError, match=r"needs each micro-batch's bigbatch.LossSum\(sum, "
                                        r"count\), got Tensor.*from_mean"):
        exact.backward(model(torch.ones(3, 2)).mean())


def test_deepspeed_fsdp1_and_swapped_arguments_are_refused_naming_the_fix() -> None:
    from bigbatch.integrations.accelerate import ExactAccumulation

    model = torch.nn.Linear(2, 1)

    def fake(kind: str, **more) -> SimpleNamespace:  # an Accelerator's attributes it reads
        return SimpleNamespace(distributed_type=kind, backward=None, sync_gradients=True, **more)

    with pytest.raises(IntegrationError, match="bigbatch.integrations.deepspeed"):
        ExactAccumulation(fake("DistributedType.DEEPSPEED"), model)
    with pytest.raises(IntegrationError, match="fsdp_version=2"):
        ExactAccumulation(fake("DistributedType.FSDP", is_fsdp2=False), model)
    with pytest.raises(IntegrationError, match="accelerator must be the accelerate.Accelerator"):
        ExactAccumulation(model, fake("DistributedType.NO"))  # type: ignore[arg-type]
    with pytest.raises(IntegrationError, match="model must be the torch.nn.Module"):
        ExactAccumulation(fake("DistributedType.NO"), "model")  # type: ignore[arg-type]


def test_a_step_without_a_counted_micro_batch_is_refused() -> None:
    """accelerator.backward on a mean, then exact.backward never called: the optimizer would
    step on an unnormalized gradient; finishing such a cycle is refused."""
    from bigbatch.integrations._rule import ExactCycle

    with pytest.raises(IntegrationError, match="no micro-batch of this cycle went through"):
        ExactCycle("ExactAccumulation.backward").finish([], divisor=2, world=1)
