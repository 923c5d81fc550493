"""``bigbatch train --pack``: which cut ``auto`` picks, every mode against an independent plain
PyTorch full batch (tests/support/appref.py) in float64, the cost model recorded for resume, and
the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from appref import full_batch_weights, max_rel_diff_named
from runcli import run
from safetensors.torch import load_file

MODEL = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
         "--device", "cpu", "--eval-samples", "16"]
FLAGS = dict(steps=3, dtype="float64", warmup=0, global_batch=8, micro_batch=2, eval_samples=16,
             n_layer=1, d_model=32, n_head=2, seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def ragged(tmp_path_factory: pytest.TempPathFactory, text: Path) -> Path:
    """One sample per source line: 2 to 32 bytes, most of each row padding."""
    path = tmp_path_factory.mktemp("ragged") / "lines.jsonl"
    path.write_text("".join(json.dumps({"text": x}) + "\n"
                            for x in text.read_text().splitlines() if len(x) > 1))
    return path


def train(tmp_path: Path, name: str, data: Path, *flags: str):
    out = tmp_path / name
    r = run("train", "--data", str(data), "--steps", "3", "--dtype", "float64", "--warmup", "0",
            "--global-batch", "8", "--micro-batch", "2", "--eval-every", "0", *MODEL,
            "--out", str(out), *flags)
    assert r.returncode == 0, r.stderr
    return out, r.stderr


@pytest.mark.slow
def test_every_mode_ends_at_the_full_batch(tmp_path: Path, ragged: Path) -> None:
    """auto partitions such data (and says why); rows, partition, tokens and none all end at
    the weights of one plain full-batch step per global batch (1e-10)."""
    truth, start = full_batch_weights(data=str(ragged), **FLAGS)
    seen = {}
    for mode in ("auto", "rows", "partition", "tokens", "none"):
        out, log = train(tmp_path, mode, ragged, "--pack", mode)
        seen[mode] = log
        assert max_rel_diff_named(load_file(str(out / "model.safetensors")), truth) <= 1e-10, mode
    assert max_rel_diff_named(truth, start) > 1e-3  # training moved the weights
    assert "--pack auto: " in seen["auto"] and "would be padding" in seen["auto"]
    assert "partitioned by length for speed by a cost model, at most 64 tokens" in seen["auto"]
    assert "packed into padding-free rows, at most 64 tokens per micro-batch" in seen["rows"]
    assert "partitioned by length for speed by a cost model" in seen["partition"]
    assert "cost model (recorded as --pack-cost " in seen["partition"]
    assert "packed by length into micro-batches of at most 64 tokens" in seen["tokens"]
    assert "4 micro-batches of 2 × 32 bytes" in seen["none"]


@pytest.mark.slow
def test_auto_leaves_full_length_data_alone(tmp_path: Path, text: Path) -> None:
    """Windows of a running text are full but for each document's last: nothing to pack."""
    _, log = train(tmp_path, "auto", text)
    assert "4 micro-batches of 2 × 32 bytes" in log and "--pack auto" not in log


@pytest.mark.slow
def test_the_partition_is_recorded_and_a_resume_cuts_the_same_way(tmp_path: Path,
                                                                  ragged: Path) -> None:
    out, log = train(tmp_path, "run", ragged, "--pack", "partition", "--save-every", "1",
                     "--keep", "10", "--steps", "4")
    recorded = yaml.safe_load((out / "config.yaml").read_text())["batch"]["pack_cost"]
    assert f"--pack-cost {recorded}" in log
    done = load_file(str(out / "model.safetensors"))
    for ckpt in (out / "checkpoints").iterdir():  # as if killed after step 2
        if not ckpt.name.startswith(("step-00000001", "step-00000002")):
            shutil.rmtree(ckpt)
    (out / "model.safetensors").unlink()
    r = run("train", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    assert "cost model (recorded" not in r.stderr  # not measured again: the recorded one
    again = load_file(str(out / "model.safetensors"))
    assert all((done[k] == again[k]).all() for k in done)
    # given by hand, it is used as given
    out2, log2 = train(tmp_path, "given", ragged, "--pack", "partition", "--pack-cost",
                       "0.001,1e-6,0")
    assert "cost model (recorded" not in log2
    assert yaml.safe_load((out2 / "config.yaml").read_text())["batch"]["pack_cost"] == \
        "0.001,1e-6,0"


@pytest.mark.parametrize(("flags", "says"), [
    (["--pack", "rows", "--task", "classify", "--model", "x"],
     "--pack rows packs sequences of next-token"),
    (["--pack", "tokens", "--accum-schedule", "0:2"], "give one of them"),
    (["--pack", "none", "--micro-tokens", "64"], "--pack none cuts by --micro-batch samples"),
    (["--pack", "partition", "--pack-cost", "1,x,2"], "--pack-cost '1,x,2' is not three"),
    (["--pack-cost", "0,0,0"], "is not three numbers >= 0"),
    (["--pack", "rows", "--micro-batch", "auto"], "--micro-batch auto and --pack rows"),
    (["--pack", "rowz"], "invalid choice: 'rowz'"),
])
def test_bad_packing_flags_are_one_line_errors(flags: list[str], says: str,
                                               tmp_path: Path) -> None:
    r = run("train", "--out", str(tmp_path / "x"), *flags)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_rows_are_refused_for_a_model_that_lets_samples_see_each_other() -> None:
    """--pack rows checks the model once: two samples packed into one row must each get the
    logits they get alone. A causal LM that ignores position_ids fails that, in one line."""
    import types

    import torch

    from bigbatch.app.packmode import rows_refused

    class Leaky(torch.nn.Module):  # causal, but blind to the restarts of position_ids
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.mix = torch.nn.Linear(8, 16)

        def get_input_embeddings(self) -> torch.nn.Embedding:
            return self.emb

        def forward(self, input_ids, position_ids=None, **_):
            h = self.emb(input_ids).cumsum(1)  # every position sees all before it
            return types.SimpleNamespace(logits=self.mix(h))

    work = types.SimpleNamespace(kind="hf", model=Leaky(), device=torch.device("cpu"))
    assert rows_refused(work) == ("the model lets attention cross from one packed sample into "
                                  "the next")
    work.kind = "factory"
    assert "module:function model" in rows_refused(work)
    work.kind = "gpt"
    assert rows_refused(work) == ""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("pack", "parallel"), [("partition", "ddp"), ("rows", "ddp"),
                                                ("partition", "fsdp2")])
def test_two_ranks_pack_their_shares_exactly(pack: str, parallel: str, tmp_path: Path,
                                             ragged: Path) -> None:
    """Under torchrun each rank packs its own half of every global batch (rank 0's cost model
    for both), the ranks' micro-batch counts evened out with empty ones: the update is the full
    batch's."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "bigbatch", "train", "--data", str(ragged), "--steps", "3", "--dtype", "float64",
         "--warmup", "0", "--global-batch", "8", "--micro-batch", "2", "--eval-every", "0",
         *MODEL, "--out", str(out), "--pack", pack, "--parallel", parallel],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(4 per rank × 2 ranks" in r.stderr
    truth, _ = full_batch_weights(data=str(ragged), **FLAGS)
    assert max_rel_diff_named(load_file(str(out / "model.safetensors")), truth) <= 1e-10


def test_records_left_out_are_reported_for_the_built_in_gpt(tmp_path: Path) -> None:
    """Records longer than --seq-len are left out and counted, for the built-in GPT as for a
    Hugging Face model (the built-in path used to drop that line), and its sampled completions
    stay within the model's positions (they used to run past them and crash the run's end)."""
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q" * n, "completion": " A"}) + "\n"
                            for n in (5, 80, 6, 7, 90, 8, 9, 10, 11, 12)))
    r = run("train", "--data", str(data), "--steps", "1", "--global-batch", "4", "--micro-batch",
            "2", "--eval-data", str(data), *MODEL, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert ("training data: left out 2 of 10 records (--on-bad-sample skip): 2 longer than "
            "--seq-len 32 tokens (first: r.jsonl:2)") in r.stderr
