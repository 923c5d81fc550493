"""DDP and FSDP2 on 2 CPU processes (gloo) against single-process full-batch training, float64."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from dist_worker import STEPS, WORLD, K, data, launch, lm_sum, model, sgd
from reference import RTOL, concat, full_batch_train, lm_mean_loss, max_rel_diff
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available(), reason="torch without distributed"),
              pytest.mark.usefixtures("float64")]




def results(case: str, tmp_path: Path) -> list[dict]:
    launch(case, tmp_path)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def truth() -> torch.nn.Module:
    """One process, one full-batch step per optimizer step on the union of all ranks' data."""
    cycles = [[mb for per_rank in step for mb in per_rank] for step in data()]
    return full_batch_train(model(), sgd, cycles, lm_mean_loss, clip=0.5)


def truth_losses() -> list[float]:
    """The full-batch mean loss of each step, along the same trajectory as :func:`truth`."""
    m = model()
    opt, out = sgd(m), []
    for step in data():
        batch = concat([mb for per_rank in step for mb in per_rank])
        opt.zero_grad()
        loss = lm_mean_loss(m, batch)
        out.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        opt.step()
    return out


def test_data_is_uneven_across_ranks() -> None:
    tokens = [[sum(int((mb["labels"] != -100).sum()) for mb in per_rank) for per_rank in step]
              for step in data()]
    assert all(t[1] > 5 * t[0] for t in tokens)  # what per-rank averaging would get wrong


@pytest.mark.parametrize("case", ["ddp", "fsdp2_cycle", "fsdp2_micro"])
def test_matches_single_process_full_batch(case: str, tmp_path: Path) -> None:
    ranks = results(case, tmp_path)
    ref = truth()
    for r in ranks:
        assert max_rel_diff(r["params"], list(ref.parameters())) <= RTOL
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    expected = truth_losses()
    for r in ranks:  # every rank reports the global token mean
        assert r["losses"] == pytest.approx(expected, rel=RTOL)


def noise_truth() -> list[list[float]]:
    """The estimates from their definition, in plain PyTorch on one process (no bigbatch): each of
    the 2K micro-batches' mean-loss gradient g_k over its B_k tokens, the full batch's g_N over N,
    s = mean |g_k|², h = mean 1/B_k, tr Σ = (s − |g_N|²)/(h − 1/N), |G|² = |g_N|² − tr Σ/N;
    then the full-batch SGD step, as training takes it."""
    m = model()
    opt, out = sgd(m), []

    def sq_norm_of_grad(loss: torch.Tensor) -> float:
        m.zero_grad(set_to_none=True)
        loss.backward()
        return sum(float(p.grad.pow(2).sum()) for p in m.parameters() if p.grad is not None)

    for step in data():
        micro = [mb for per_rank in step for mb in per_rank]
        counts = [int((mb["labels"] != -100).sum()) for mb in micro]
        s = sum(sq_norm_of_grad(lm_mean_loss(m, mb)) for mb in micro) / len(micro)
        h = sum(1 / b for b in counts) / len(micro)
        n = sum(counts)
        big = sq_norm_of_grad(lm_mean_loss(m, concat(micro)))
        trace = (s - big) / (h - 1 / n)
        out.append([big - trace / n, trace, 1 / h, n])
        opt.step()  # on the full batch's gradient, still in .grad
    return out


def test_noise_scale_under_ddp_matches_its_definition(tmp_path: Path) -> None:
    """2 ranks × K micro-batches give the estimates of the definition over all 2K micro-batches;
    counting only one rank's micro-batches (the negative case) does not."""
    ranks = results("noise", tmp_path)
    want = noise_truth()
    for got, w in zip(ranks[0]["noise"], want):
        assert got == pytest.approx(w, rel=1e-9)
    assert ranks[0]["noise"] == ranks[1]["noise"]
    # the negative case: the estimate of rank 0's own micro-batches alone (no all-reduce of the
    # sums) is another number
    m = model()
    micro = data()[0][0]
    counts = [int((mb["labels"] != -100).sum()) for mb in micro]
    grads = []
    for mb in micro:
        m.zero_grad(set_to_none=True)
        lm_mean_loss(m, mb).backward()
        grads.append(sum(float(p.grad.pow(2).sum()) for p in m.parameters()))
    m.zero_grad(set_to_none=True)
    lm_mean_loss(m, concat(micro)).backward()
    big = sum(float(p.grad.pow(2).sum()) for p in m.parameters())
    h, n = sum(1 / b for b in counts) / len(micro), sum(counts)
    local_trace = (sum(grads) / len(micro) - big) / (h - 1 / n)
    assert abs(local_trace - want[0][1]) / abs(want[0][1]) > 1e-3


def test_contrastive_gradient_cache_under_ddp(tmp_path: Path) -> None:
    """Embeddings are all-gathered: 2 ranks with 8 and 16 rows take the full-batch step of 24."""
    from dist_worker import contrastive_data, contrastive_model

    from bigbatch.contrastive import info_nce

    ranks = results("contrastive", tmp_path)
    m = contrastive_model()
    q, d = contrastive_data()
    ls = info_nce(*m(q, d), symmetric=True)
    (ls.sum / ls.count).backward()
    ls = ls._replace(sum=ls.sum.detach())
    with torch.no_grad():
        for p in m.parameters():
            p -= 0.5 * p.grad
    for r in ranks:
        assert max_rel_diff(r["params"], list(m.parameters())) <= RTOL
    assert ranks[0]["loss"] == pytest.approx(ls.sum.item() / ls.count, rel=RTOL)
    # the negative case: each rank's own rows as its only negatives (no all-gather), the
    # per-rank mean losses averaged by DDP, takes another step
    local = contrastive_model()
    for lo, hi in ((0, 8), (8, 24)):
        ls = info_nce(*local(q[lo:hi], d[lo:hi]), symmetric=True)
        (ls.sum / ls.count / 2).backward()
    with torch.no_grad():
        for p in local.parameters():
            p -= 0.5 * p.grad
    assert max_rel_diff(list(local.parameters()), list(m.parameters())) > 1e-3


@pytest.mark.parametrize("case", ["ddp_naive", "fsdp2_cycle_naive", "fsdp2_micro_naive"])
def test_naive_recipe_differs(case: str, tmp_path: Path) -> None:
    """The negative twins of test_matches_single_process_full_batch: the same runs with each
    micro-batch's own token mean, / K (and averaged over ranks), end elsewhere."""
    ranks = results(case, tmp_path)
    assert max_rel_diff(ranks[0]["params"], list(truth().parameters())) > 1e-3


def test_one_gradient_all_reduce_per_optimizer_step(tmp_path: Path) -> None:
    cycle = results("syncs_cycle", tmp_path)[0]["calls"].tolist()
    micro = results("syncs_micro", tmp_path)[0]["calls"].tolist()
    buckets = len(cycle) // STEPS
    assert buckets >= 1 and len(cycle) == STEPS * buckets
    assert all(m == K for _, m in cycle)  # all in the cycle's last micro-batch (counted 1..K)
    assert sorted({s for s, _ in cycle}) == list(range(STEPS))
    assert len(micro) == K * len(cycle)  # without no_sync: K rounds per step
    assert sorted({m for _, m in micro}) == list(range(1, K + 1))


def test_split_mode_syncs_once_in_finish_not_in_backward(tmp_path: Path) -> None:
    assert results("syncs_split", tmp_path)[0]["calls"].numel() == 0  # no DDP hook round


def test_one_rank_out_of_memory_mid_cycle_stays_exact(tmp_path: Path) -> None:
    ranks = results("ddp_oom", tmp_path)
    assert ranks[0]["raised"] == 0 and ranks[1]["raised"] == 2
    assert ranks[1]["splits"] == [1, 0, 1] and ranks[0]["splits"] == [0, 0, 0]
    ref = truth()
    for r in ranks:
        assert max_rel_diff(r["params"], list(ref.parameters())) <= RTOL
        assert r["losses"] == pytest.approx(truth_losses(), rel=RTOL)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))


def test_out_of_memory_retry_that_adds_twice_under_ddp_differs(tmp_path: Path) -> None:
    """The negative twin: the same run, with the split's halves adding their gradient to the
    parameters the failed backward had already reached, is no longer the full batch."""
    ranks = results("ddp_oom_forgetful", tmp_path)
    assert ranks[1]["raised"] == 2
    assert max_rel_diff(ranks[0]["params"], list(truth().parameters())) > 1e-3


def test_ranks_with_different_micro_batch_counts_stop_together(tmp_path: Path) -> None:
    ranks = results("uneven", tmp_path)
    for r in ranks:
        assert "ranks disagree on this cycle's micro-batches" in r["error"]
        assert "fewest 2, most 3" in r["error"]


def test_unsupported_setups_are_refused(tmp_path: Path) -> None:
    r = results("refusals", tmp_path)[0]
    assert "plain TinyLM in a process group of 2 ranks" in r["plain"]
    assert "DistributedDataParallel" in r["plain"]
    assert "pass last=True" in r["fsdp2_no_last"]
    assert "oom='split' is not available here: FSDP2" in r["split_fsdp2"]
    assert "broadcast_buffers=False" in r["split_ddp_buffers"]
    assert r["split_ddp_no_broadcast"] is True  # the way out the message names works


def test_fsdp1_is_refused() -> None:
    """FSDP1 cannot be built without an accelerator; the refusal reads only the model's type, so
    an instance made without FSDP1's own __init__ is enough on CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from bigbatch import Accumulator
    from bigbatch.engine.sync import DistributedError

    class Unbuilt(FullyShardedDataParallel):
        __getattr__ = torch.nn.Module.__getattr__
        named_parameters = torch.nn.Module.named_parameters
        named_buffers = torch.nn.Module.named_buffers

        def __init__(self, inner: torch.nn.Module) -> None:
            torch.nn.Module.__init__(self)
            # what FSDP1's own attribute lookups reach for (a later gc or hook may ask)
            self._fsdp_wrapped_module = inner
            self.__dict__["training_state"] = None

    inner = torch.nn.Linear(2, 2)
    fsdp1 = Unbuilt(inner)
    with pytest.raises(DistributedError, match=r"FSDP1 \(FullyShardedDataParallel\) is not "
                                               "supported: wrap the model with"):
        Accumulator(fsdp1, torch.optim.SGD(inner.parameters(), lr=0.1))


def test_single_process_without_group_is_unchanged() -> None:
    from bigbatch import Accumulator

    m = model()
    acc = Accumulator(m, sgd(m), clip_grad_norm=0.5)
    assert not acc.sync.active and acc.sync.world_size == 1
    for step in data():
        acc.step([mb for per_rank in step for mb in per_rank], lm_sum)
    assert max_rel_diff(m, truth()) <= RTOL


# -- bigbatch train under torchrun ------------------------------------------------------------

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
        "--eval-samples", "8", "--eval-every", "10", "--device", "cpu", "--global-batch", "16",
        "--micro-batch", "2", "--warmup", "2", "--dtype", "float64"]


def bigbatch(*args: str, world: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "bigbatch", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def weights(out: Path) -> list[torch.Tensor]:
    w = load_file(str(out / "model.safetensors"))
    return [w[k] for k in sorted(w)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes())
    return path


def reference(data_path: Path, steps: int) -> dict[str, torch.Tensor]:
    """The independent plain PyTorch full-batch run of TINY's settings (tests/support/appref.py)."""
    from appref import full_batch_weights

    truth, _ = full_batch_weights(
        data=str(data_path), steps=steps, n_layer=1, d_model=32, n_head=2, seq_len=32,
        eval_samples=8, eval_every=10, device="cpu", global_batch=16, micro_batch=2, warmup=2,
        dtype="float64")
    return truth


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    r = bigbatch("train", "--data", str(corpus), "--steps", "4", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_is_world_size_invariant_and_resumes(parallel: str, tmp_path: Path,
                                                      corpus: Path, one_process: Path) -> None:
    """2 ranks × K=4 end where 1 process × K=8 does; a resume of the 2-rank run too."""
    out = tmp_path / "run"
    r = bigbatch("train", "--data", str(corpus), "--steps", "4", "--save-every", "2",
                 "--out", str(out), "--parallel", parallel, *TINY, world=2)
    assert r.returncode == 0, r.stderr
    assert "× 2 ranks" in r.stderr and r.stdout.count("run folder:") == 1  # rank 0 speaks
    assert json.loads((out / "run.json").read_text())["accum_steps"] == 4
    assert max_rel_diff(weights(out), weights(one_process)) <= RTOL
    from appref import max_rel_diff_named  # and both equal plain PyTorch on the full batch

    truth = reference(corpus, 4)
    assert max_rel_diff_named(load_file(str(out / "model.safetensors")), truth) <= RTOL
    assert max_rel_diff_named(load_file(str(one_process / "model.safetensors")), truth) <= RTOL
    # lose the last checkpoint and the weights, and resume on 2 ranks from step 2
    shutil.rmtree(out / "checkpoints" / "step-00000004-micro-0000")
    (out / "model.safetensors").unlink()
    r = bigbatch("train", "--resume", str(out), world=2)
    assert r.returncode == 0, r.stderr
    assert "resuming from step-00000002-micro-0000" in r.stderr
    assert max_rel_diff(weights(out), weights(one_process)) <= RTOL


def test_torchrun_micro_batch_auto_agrees_on_one_choice(tmp_path: Path, corpus: Path) -> None:
    """--micro-batch auto on 2 ranks: every rank plans, all take one size (rank 0 reports it), and
    the run is still the full batch's (tests/support/appref.py)."""
    from appref import max_rel_diff_named

    out = tmp_path / "run"
    r = bigbatch("train", "--data", str(corpus), "--steps", "2", "--out", str(out), *TINY,
                 "--micro-batch", "auto", "--memory", "64GiB", world=2)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("chosen: micro-batch") == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())["batch"]
    assert saved["micro_batch"] in (1, 2, 4, 8) and saved["global_batch"] == 16
    assert max_rel_diff_named(load_file(str(out / "model.safetensors")),
                              reference(corpus, 2)) <= RTOL


@pytest.fixture(scope="module")
def ragged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One document per source line: samples of 2 to 33 bytes, mostly short."""
    lines = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    path = tmp_path_factory.mktemp("ragged") / "lines.jsonl"
    path.write_text("".join(json.dumps({"text": x}) + "\n" for x in lines if len(x) > 1))
    return path


def test_torchrun_packed_by_tokens_matches_one_process_fixed_split(tmp_path: Path,
                                                                   ragged: Path) -> None:
    """2 DDP ranks, each packing its share by length (ranks get different numbers of
    micro-batches, padded with empty ones), end where 1 process with fixed micro-batches does."""
    fixed, packed = tmp_path / "fixed", tmp_path / "packed"
    r = bigbatch("train", "--data", str(ragged), "--steps", "3", "--out", str(fixed),
                 "--pack", "none", *TINY)
    assert r.returncode == 0, r.stderr
    r = bigbatch("train", "--data", str(ragged), "--steps", "3", "--out", str(packed),
                 "--micro-tokens", "64", "--pack", "tokens", *TINY, world=2)
    assert r.returncode == 0, r.stderr
    assert "packed by length into micro-batches of at most 64 tokens" in r.stderr
    assert max_rel_diff(weights(packed), weights(fixed)) <= RTOL
    from appref import max_rel_diff_named  # and both equal plain PyTorch on the full batch

    truth = reference(ragged, 3)
    assert max_rel_diff_named(load_file(str(packed / "model.safetensors")), truth) <= RTOL
    assert max_rel_diff_named(load_file(str(fixed / "model.safetensors")), truth) <= RTOL


def test_torchrun_refuses_mid_cycle_checkpoints_under_fsdp2(tmp_path: Path,
                                                            corpus: Path) -> None:
    r = bigbatch("train", "--data", str(corpus), "--steps", "2", "--save-every-micro", "1",
                 "--parallel", "fsdp2", "--out", str(tmp_path / "run"), *TINY, world=2)
    assert r.returncode != 0
    assert "FSDP2 keeps a cycle's partial gradient unsharded" in r.stderr
    assert not (tmp_path / "run").exists()
