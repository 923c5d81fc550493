"""``bigbatch verify`` as a user runs it: a model that trains with dropout, ``--precision``, and
the flags it takes (in this process through ``main(argv)``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from runcli import run

MODEL = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
         "--device", "cpu"]

GPT2_SETUP = """
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import bigbatch


def make_dropout():  # GPT2Config's dropout: attn_pdrop = resid_pdrop = embd_pdrop = 0.1
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    for i, n in enumerate([3, 12, 5, 1, 12, 7, 9, 2]):
        mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return bigbatch.token_cross_entropy(logits[:, :-1], b["labels"][:, 1:])

    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return GPT2LMHeadModel(config), batch, loss_fn
"""


@pytest.mark.parametrize("micro", ["2", "8"])  # K = 4, and K = 1 (which failed as well)
def test_verify_a_model_with_dropout_switches_it_off_and_says_so(tmp_path: Path,
                                                                 micro: str) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "mysetup.py").write_text(GPT2_SETUP)
    r = run("verify", "--model", f"{tmp_path / 'mysetup.py'}:make_dropout", "--dtype", "float64",
            "--global-batch", "8", "--micro-batch", micro, "--steps", "2", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    said = [line for line in lines if line.startswith("dropout switched off in both copies")]
    assert len(said) == 1
    assert "Dropout modules (p=0.1)" in said[0] and "attn_pdrop" in said[0]
    assert lines[-1].startswith("PASS: worst relative difference") and "rtol 1e-10" in lines[-1]


@pytest.mark.parametrize(("precision", "rtol"), [("bf16", "1e-01"), ("fp16", "1e-02")])
def test_verify_compares_in_the_precision_asked_at_a_stated_tolerance(
        text: Path, precision: str, rtol: str) -> None:
    args = ["verify", "--data", str(text), "--steps", "1", "--global-batch", "8",
            "--micro-batch", "2", *MODEL]
    fp32 = run(*args)
    amp = run(*args, "--precision", precision)
    assert amp.returncode == 0, amp.stdout + amp.stderr
    verdict = amp.stdout.splitlines()[-1]
    assert verdict.startswith("PASS") and f"rtol {rtol} (float32 under {precision} autocast" \
        in verdict
    assert amp.stdout.splitlines()[2] != fp32.stdout.splitlines()[2]  # not ignored: numbers move
    r = run(*args, "--precision", precision, "--dtype", "float64")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--dtype float32" in r.stderr


def test_verify_help_lists_precision_and_no_train_only_flag() -> None:
    r = run("verify", "--help")
    assert r.returncode == 0 and "--precision {fp32,bf16,fp16}" in r.stdout
    for train_only in ("--accum-schedule", "--lr-scaling", "--warmup", "--save-every",
                       "--resume", "--steps STEPS"):
        assert train_only not in r.stdout
    r = run("verify", "--accum-schedule", "ramp:8:64", "--lr-scaling", "sqrt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "bigbatch verify does not use --accum-schedule, --lr-scaling" in r.stderr
