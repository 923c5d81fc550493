"""HF Trainer (transformers >= 5) + ``ExactTrainer`` against the full batch, float64.

Padded rows of 1 to 12 real tokens (``trainer_data``), micro-batches of 2 rows, K = 3, 28 rows:
a short last cycle in every epoch; SGD with momentum, ``max_grad_norm`` (active on some steps),
the Trainer's linear schedule, 2 epochs. The truth is plain PyTorch on each step's rows at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # each test trains or builds a Trainer (imports: seconds)

import hf_worker  # noqa: E402
import trainer_data as td  # noqa: E402

from bigbatch import LossError  # noqa: E402
from bigbatch.integrations import IntegrationError  # noqa: E402


@pytest.fixture(scope="module")
def start() -> torch.nn.Module:
    return td.gpt2()


@pytest.fixture(scope="module")
def full(start: torch.nn.Module) -> tuple[torch.nn.Module, list[float], list[float]]:
    return td.truth(start)


@pytest.fixture(scope="module")
def exact(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return hf_worker.train("exact", tmp_path_factory.mktemp("exact"))


def test_data_is_uneven_with_a_short_last_cycle(full) -> None:
    tokens = td.tokens_per_micro_batch()
    assert max(tokens) > 5 * min(tokens) and len(tokens) % td.K != 0
    _, _, norms = full
    assert min(norms) < td.CLIP < max(norms)  # clipping acts on some steps, not all


def test_peer_claim_trainer_counts_unshifted_labels_for_gpt2(tmp_path: Path) -> None:
    """What HF's own count is for GPT2LMHeadModel (loss_type unset): every label that is not
    -100, one per row more than its causal loss sums over."""
    from transformers import Trainer

    trainer = Trainer(model=td.gpt2(), args=hf_worker.arguments(tmp_path),
                      train_dataset=td.rows(), data_collator=td.collate)
    batches = [td.collate(td.rows()[i:i + td.MICRO]) for i in range(0, 3 * td.MICRO, td.MICRO)]
    _, counted = trainer.get_batch_samples(iter(batches), td.K, torch.device("cpu"))
    unshifted = sum(int((b["labels"] != -100).sum()) for b in batches)
    shifted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert int(counted) == unshifted == shifted + td.K * td.MICRO


def test_exact_trainer_matches_full_batch(start, full, exact) -> None:
    want, losses, norms = full
    assert exact["global_step"] == len(td.cycles())
    assert td.distance(exact["params"], want, start) <= td.RTOL
    # logged once per optimizer step: the exact mean loss and the full-batch gradient norm
    assert exact["losses"] == pytest.approx(losses, rel=1e-6)  # the Trainer logs in float32
    assert exact["grad_norms"] == pytest.approx(norms, rel=1e-10)


def test_negative_twin_plain_trainer_is_off(start, full, tmp_path: Path) -> None:
    want, losses, _ = full
    default = hf_worker.train("default", tmp_path)
    assert td.distance(default["params"], want, start) > 1e-3
    assert default["losses"] != pytest.approx(losses, rel=1e-3)


def test_resume_from_a_mid_epoch_checkpoint_is_the_same_run(exact, tmp_path: Path) -> None:
    first = hf_worker.train("exact", tmp_path, save_strategy="steps", save_steps=4)
    resumed = hf_worker.train("exact", tmp_path, resume=str(tmp_path / "checkpoint-4"),
                              save_strategy="no")
    for a, b, c in zip(first["params"], resumed["params"], exact["params"]):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_bf16_autocast_runs_and_stays_near_the_full_batch(start, full, tmp_path: Path) -> None:
    """bf16 mixed precision (a float32 model, the Trainer's autocast): exact up to bf16 rounding,
    an order of magnitude closer than the plain Trainer in the same precision."""
    want, _, _ = full
    got = {case: hf_worker.train(case, tmp_path / case, model=td.gpt2().float(), bf16=True)
           for case in ("exact", "default")}
    exact_d = td.distance(got["exact"]["params"], want, start)
    default_d = td.distance(got["default"]["params"], want, start)
    assert exact_d < default_d / 10, (exact_d, default_d)


@pytest.mark.distributed
def test_ddp_two_ranks_match_full_batch(start, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes; each rank sees other micro-batches (every other one) and far
    fewer tokens on rank 0. The plain Trainer, same data, same processes: off."""
    td.torchrun(Path(hf_worker.__file__), "exact,default", tmp_path)
    want, losses, _ = td.truth(start, world=2)
    ranks = {case: [torch.load(tmp_path / f"{case}-rank{r}.pt") for r in (0, 1)]
             for case in ("exact", "default")}
    seen = [sum(r["tokens"]) for r in ranks["exact"]]
    assert seen == [2 * t for t in td.per_rank_tokens(2, "batch")] and seen[1] > 1.3 * seen[0]
    for r in ranks["exact"]:
        assert td.distance(r["params"], want, start) <= td.RTOL
        assert r["losses"] == pytest.approx(losses, rel=1e-6)
    for r in ranks["default"]:
        assert td.distance(r["params"], want, start) > 1e-3


# -- refusals: one line each, naming the fix --------------------------------------------------

def _trainer(tmp_path: Path, **kw):
    from bigbatch.integrations.transformers import ExactTrainer

    args = kw.pop("args", None) or hf_worker.arguments(tmp_path)
    return ExactTrainer(model=kw.pop("model", None) or td.gpt2(), args=args,
                        train_dataset=td.rows(), data_collator=td.collate, **kw)


def test_refuses_the_trainers_own_loss_division(tmp_path: Path) -> None:
    with pytest.raises(IntegrationError, match="loss_fn=.*instead of compute_loss_func"):
        _trainer(tmp_path, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)

    from bigbatch.integrations.transformers import ExactTrainer

    class Dividing(ExactTrainer):
        loss_is_scaled_for_ga = False

    with pytest.raises(IntegrationError, match="leave it True"):
        Dividing(model=td.gpt2(), args=hf_worker.arguments(tmp_path), train_dataset=td.rows(),
                 data_collator=td.collate)


def test_refuses_a_loss_without_a_count(tmp_path: Path) -> None:
    def mean_only(outputs, labels):
        return torch.nn.functional.cross_entropy(outputs.logits[:, :-1].reshape(-1, td.VOCAB),
                                                 labels[:, 1:].reshape(-1))

    trainer = _trainer(tmp_path, loss_fn=mean_only, args=hf_worker.arguments(tmp_path,
                                                                             max_steps=1))
    with pytest.raises(LossError, match=r"LossSum\(sum, count\).*from_mean"):
        trainer.train()


def test_refuses_label_smoothing_and_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(IntegrationError, match="label_smoothing_factor.*set it to 0"):
        _trainer(tmp_path, args=hf_worker.arguments(tmp_path, label_smoothing_factor=0.1))
    with pytest.raises(IntegrationError, match="cannot tell how Linear counts.*loss_fn="):
        _trainer(tmp_path, model=torch.nn.Linear(2, 2))
    with pytest.raises(IntegrationError, match="loss_fn must be a function.*causal_lm_loss"):
        _trainer(tmp_path, loss_fn="causal")


def test_a_loss_outside_the_integration_is_caught_at_the_step(tmp_path: Path) -> None:
    """A subclass whose compute_loss bypasses ExactTrainer's (the model's own mean loss)."""
    from bigbatch.integrations.transformers import ExactTrainer

    class OwnLoss(ExactTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    trainer = OwnLoss(model=td.gpt2(), args=hf_worker.arguments(tmp_path, max_steps=1),
                      train_dataset=td.rows(), data_collator=td.collate)
    with pytest.raises(IntegrationError, match="no micro-batch of this cycle went through"):
        trainer.train()


def test_evaluation_reports_the_mean_loss(tmp_path: Path) -> None:
    """Evaluation goes through the same loss: one batch of 4 rows, its mean over real tokens."""
    trainer = _trainer(tmp_path, eval_dataset=td.rows()[:4])
    metrics = trainer.evaluate()
    with torch.no_grad():
        want = td.lm_mean(trainer.model, td.collate(td.rows()[:4])).item()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-6)


def test_a_cycle_cut_short_before_train_is_not_continued(exact, tmp_path: Path) -> None:
    """A partial cycle left behind (an exception mid-cycle, auto_find_batch_size restarting
    the loop) is dropped when training begins: the run equals the clean one."""
    import bigbatch

    trainer = _trainer(tmp_path)
    stale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    trainer._exact.scaled(bigbatch.LossSum(stale, 7))
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), exact["params"]))
