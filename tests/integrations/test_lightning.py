"""Lightning 2.x + the ``ExactAccumulation`` callback against the full batch, float64.

A ``LightningModule`` trained with ``accumulate_grad_batches=3``, ``gradient_clip_val`` (active on
some steps) and a per-step linear schedule, SGD with momentum, on padded rows of very uneven
length (``trainer_data``): micro-batches of 2 rows, 14 per epoch, so every epoch ends with a short
cycle (which Lightning alone still divides by 3); 2 epochs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytestmark = pytest.mark.slow  # each test runs a Lightning fit (imports: seconds)

import lightning_worker  # noqa: E402
import trainer_data as td  # noqa: E402

from bigbatch import LossError  # noqa: E402
from bigbatch.integrations import IntegrationError  # noqa: E402


@pytest.fixture(scope="module")
def start() -> torch.nn.Module:
    return td.gpt2()


@pytest.fixture(scope="module")
def full(start: torch.nn.Module) -> tuple[torch.nn.Module, list[float], list[float]]:
    return td.truth(start)


def test_callback_matches_full_batch(start, full, tmp_path: Path) -> None:
    want, losses, norms = full
    got = lightning_worker.train("exact", tmp_path)
    assert got["global_step"] == len(td.cycles())
    assert td.distance(got["params"], want, start) <= td.RTOL
    assert got["grad_norms"] == pytest.approx(norms, rel=1e-10)  # what clipping sees
    # logged once per optimizer step: the exact mean (Lightning keeps logged values in float32)
    assert [s for s, _ in got["losses"]] == list(range(len(losses)))
    assert [v for _, v in got["losses"]] == pytest.approx(losses, rel=1e-6)


def test_negative_twin_accumulate_grad_batches_alone_is_off(start, full, tmp_path: Path) -> None:
    want, _, norms = full
    got = lightning_worker.train("default", tmp_path)
    assert td.distance(got["params"], want, start) > 1e-3
    assert got["grad_norms"] != pytest.approx(norms, rel=1e-3)


def test_resume_from_an_epoch_checkpoint_is_the_same_run(tmp_path: Path) -> None:
    whole = lightning_worker.train("exact", tmp_path / "whole")
    lightning_worker.train("exact", tmp_path / "first", epochs=1, save_every_epoch=True)
    ckpt = next((tmp_path / "first" / "ckpt").glob("epoch=0-*.ckpt"))
    resumed = lightning_worker.train("exact", tmp_path / "resumed", ckpt=ckpt)
    assert resumed["global_step"] == whole["global_step"]
    assert all(torch.equal(a, b) for a, b in zip(whole["params"], resumed["params"]))


def test_bf16_mixed_runs_and_stays_near_the_full_batch(start, full, tmp_path: Path) -> None:
    want, _, _ = full
    got = {case: td.distance(lightning_worker.train(
        case, tmp_path / case, net=td.gpt2().float(), precision="bf16-mixed")["params"],
        want, start) for case in ("exact", "default")}
    assert got["exact"] < got["default"] / 10, got


@pytest.mark.distributed
def test_ddp_two_processes_match_full_batch(start, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes, strategy="ddp": rank r reads every other row (far fewer
    tokens on rank 0); the same module without the integration, same processes: off."""
    td.torchrun(Path(lightning_worker.__file__), "exact,default", tmp_path)
    want, losses, norms = td.truth(start, world=2)
    ranks = {case: [torch.load(tmp_path / f"{case}-rank{r}.pt") for r in (0, 1)]
             for case in ("exact", "default")}
    seen = [sum(r["tokens"]) for r in ranks["exact"]]
    assert seen == [2 * t for t in td.per_rank_tokens(2, "row")] and seen[1] > 2 * seen[0]
    for r in ranks["exact"]:
        assert td.distance(r["params"], want, start) <= td.RTOL
        assert r["grad_norms"] == pytest.approx(norms, rel=1e-10)
    assert [v for _, v in ranks["exact"][0]["losses"]] == pytest.approx(losses, rel=1e-6)
    for r in ranks["default"]:
        assert td.distance(r["params"], want, start) > 1e-3


# -- refusals ---------------------------------------------------------------------------------

DATA = torch.arange(16, dtype=torch.float64).reshape(8, 2) / 8


def _fit(training_step, callbacks, manual: bool = False, package: str = "lightning"):
    """A one-layer LightningModule whose training_step is given; 2 steps of 2 micro-batches of
    2 rows (``DATA``), SGD. Returns the trained layer."""
    import importlib

    pl = importlib.import_module("lightning" if package == "lightning" else "pytorch_lightning")

    class M(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(2, 1).double()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            return training_step(self, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    lightning_worker.quiet()
    module = M()
    pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=1 if manual else 2,
               logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=callbacks,
               ).fit(module, torch.utils.data.DataLoader(DATA, batch_size=2))
    return module.lin


def _sum(module, batch):
    """Squared outputs of the rows whose first feature exceeds 0.3: 0, 1 or 2 items."""
    import bigbatch

    keep = batch[:, 0] > 0.3
    return bigbatch.LossSum((module.lin(batch)[keep] ** 2).sum(), int(keep.sum()))


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_both_lightning_packages_take_the_full_batch_step(package: str) -> None:
    """The callback under ``lightning.Trainer`` and ``pytorch_lightning.Trainer``: micro-batches
    of 0, 1 and 2 items, each step equal to one SGD step on its 4 rows' mean."""
    pytest.importorskip(package)
    from bigbatch.integrations.lightning import ExactAccumulation, exact_loss

    got = _fit(lambda m, b: exact_loss(m, _sum(m, b)), [ExactAccumulation()], package=package)
    torch.manual_seed(0)
    want = torch.nn.Linear(2, 1).double()
    opt = torch.optim.SGD(want.parameters(), lr=0.1)
    for rows in (DATA[:4], DATA[4:]):
        opt.zero_grad()
        keep = rows[:, 0] > 0.3
        (want(rows)[keep] ** 2).mean().backward()
        opt.step()
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_a_bare_mean_loss_is_refused_naming_the_fix() -> None:
    from bigbatch.integrations.lightning import ExactAccumulation, exact_loss

    with pytest.raises(LossError, match=r"needs each micro-batch's bigbatch.LossSum"):
        _fit(lambda m, b: exact_loss(m, m.lin(b).mean()), [ExactAccumulation()])


def test_exact_loss_without_the_callback_is_refused() -> None:
    from bigbatch.integrations.lightning import exact_loss

    with pytest.raises(IntegrationError, match=r"callbacks=\[.*ExactAccumulation\(\)\]"):
        _fit(lambda m, b: exact_loss(m, _sum(m, b)), [])


def test_the_callback_with_lightnings_own_mean_is_refused() -> None:
    """The callback on, but training_step still returns a mean that Lightning divides by K."""
    from bigbatch.integrations.lightning import ExactAccumulation

    with pytest.raises(IntegrationError, match="no micro-batch of this cycle went through"):
        _fit(lambda m, b: m.lin(b).mean(), [ExactAccumulation()])


def test_a_bad_log_name_is_refused() -> None:
    from bigbatch.integrations.lightning import ExactAccumulation

    with pytest.raises(IntegrationError, match=r"log=.*name to log .* or None, got 5"):
        ExactAccumulation(log=5)  # type: ignore[arg-type]


def test_manual_optimization_is_refused() -> None:
    from bigbatch.integrations.lightning import ExactAccumulation

    with pytest.raises(IntegrationError, match="manual optimization.*bigbatch.Accumulator"):
        _fit(lambda m, b: None, [ExactAccumulation()], manual=True)
