"""The ``bigbatch`` commands on tiny settings: in this process through ``main(argv)`` (fast), and
the installed entry points in subprocesses once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from runcli import run, run_process
from safetensors.torch import load_file, load_model

from bigbatch.app.models.gpt import GPT, GPTConfig

MODEL = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
         "--device", "cpu"]
TINY = [*MODEL, "--eval-samples", "16"]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_the_run_folder(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    r = run_process("train", "--data", str(text), "--steps", "6", "--eval-every", "3",
            "--global-batch", "8", "--micro-batch", "2", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "run.json", "metrics.jsonl", "model.safetensors", "loss.png"):
        assert (out / name).is_file(), name
    recs = records(out)
    train = [x for x in recs if x["kind"] == "train"]
    evals = [x for x in recs if x["kind"] == "eval"]
    assert [x["step"] for x in train] == [1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in evals] == [3, 6]
    for x in train:
        assert {"loss", "items", "grad_norm", "lr", "tokens_per_s", "seconds"} <= set(x)
        assert x["micro_batches"] == 4 and x["items"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "tb").glob("events.out.tfevents.*"))  # tensorboard is in the dev extra
    model = GPT(GPTConfig(seq_len=32, n_layer=1, n_head=2, d_model=32))
    missing, unexpected = load_model(model, out / "model.safetensors")  # strict: every weight
    assert not missing and not unexpected
    # progress counts optimizer steps (6), not micro-batches (24)
    assert "step 6/6" in r.stderr and "/24" not in r.stderr
    assert "final validation loss" in r.stdout
    # the resolved config records the seed and the sizes; K follows the world size (torchrun)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["runtime"]["seed"] == 0 and config["batch"]["micro_batch"] == 2
    assert config["batch"]["accum_steps"] is None
    assert json.loads((out / "run.json").read_text())["accum_steps"] == 4
    # it names no run folder, so reusing it as --config starts a new run
    assert "out" not in config["checkpoint"] and "overwrite" not in config["checkpoint"]
    assert config["data"]["data"] == str(text.absolute())


def test_train_is_deterministic(tmp_path: Path, text: Path) -> None:
    args = ["train", "--data", str(text), "--steps", "3", "--global-batch", "4",
            "--micro-batch", "2", *TINY]
    a = run(*args, "--out", str(tmp_path / "a"))
    b = run(*args, "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    keys = ("loss", "items", "grad_norm", "lr")
    ra = [[x.get(k) for k in keys] for x in records(tmp_path / "a")]
    rb = [[x.get(k) for k in keys] for x in records(tmp_path / "b")]
    assert ra == rb


def test_splitting_never_changes_what_is_learned(tmp_path: Path, text: Path) -> None:
    """Micro-batch 8 and 2 at global batch 8 both end at the weights of an independent plain
    PyTorch full-batch run (tests/support/appref.py) in float64; the naive recipe does not."""
    from appref import full_batch_weights, max_rel_diff_named

    # one document per line: padded rows of very different lengths, so the split matters
    ragged = tmp_path / "lines.jsonl"
    ragged.write_text("".join(json.dumps({"text": x}) + "\n"
                              for x in text.read_text().splitlines() if len(x) > 1))
    base = ["train", "--data", str(ragged), "--steps", "3", "--dtype", "float64", "--warmup", "0",
            "--global-batch", "8", "--eval-every", "0", "--pack", "none", *TINY]
    outs = {}
    for micro in ("8", "2"):
        out = tmp_path / f"m{micro}"
        r = run(*base, "--micro-batch", micro, "--out", str(out))
        assert r.returncode == 0, r.stderr
        outs[micro] = load_file(str(out / "model.safetensors"))
    truth, start = full_batch_weights(
        data=str(ragged), steps=3, dtype="float64", warmup=0, global_batch=8, micro_batch=8,
        eval_samples=16,
        n_layer=1, d_model=32, n_head=2, seq_len=32, device="cpu")
    for micro in ("8", "2"):
        assert max_rel_diff_named(outs[micro], truth) <= 1e-10, micro
    # and the runs moved: comparing weights that never changed would prove nothing
    assert max_rel_diff_named(outs["8"], start) > 1e-3
    # the negative case: the mean of 4 micro-batch means (plain PyTorch) ends elsewhere
    naive, _ = full_batch_weights(
        naive_k=4, data=str(ragged), steps=3, dtype="float64", warmup=0, global_batch=8,
        eval_samples=16,
        micro_batch=8, n_layer=1, d_model=32, n_head=2, seq_len=32, device="cpu")
    assert max_rel_diff_named(outs["2"], naive) > 1e-3


def test_verify_passes_in_float64_and_fails_naive() -> None:
    args = ["verify", "--dtype", "float64", "--steps", "2", "--global-batch", "8",
            "--micro-batch", "2", *MODEL]
    ok = run(*args)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout
    bad = run(*args, "--normalization", "naive")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL" in bad.stdout


def test_config_file_and_flag_precedence(tmp_path: Path, text: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"steps: 2\nlr: 1e-3\nglobal-batch: 4\nmicro_batch: 2\ndata: {text}\n"
                   "n_layer: 1\nd_model: 32\nn_head: 2\nseq_len: 32\neval_samples: 8\n")
    out = tmp_path / "run"
    r = run("train", "--config", str(cfg), "--steps", "3", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    train = [x for x in records(out) if x["kind"] == "train"]
    assert len(train) == 3  # the flag won over the file
    toml = tmp_path / "c.toml"
    toml.write_text(f'steps = 1\nglobal_batch = 4\nmicro_batch = 4\ndata = "{text}"\n'
                    'n_layer = 1\nd_model = 32\nn_head = 2\nseq_len = 32\n')
    r = run("train", "--config", str(toml), "--out", str(tmp_path / "t"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert len(records(tmp_path / "t")) == 2  # one step, one final evaluation


BAD = [
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--global-batch", "250", "--micro-batch", "8", "--accum-steps", "32"],
     "global_batch 250 is not micro_batch 8 × accum_steps 32 × world 1 = 256"),
    (["train", "--global-batch", "30", "--micro-batch", "8"], "not divisible by micro_batch 8"),
    (["train", "--steps", "0"], "--steps must be positive, got 0"),
    (["train", "--steps", "abc"], "argument --steps: needs int, got 'abc'"),
    (["train", "--micro-batch", "-2"], "--micro-batch must be positive or auto, got -2"),
    (["train", "--global-batch", "30"], "give --micro-batch or --accum-steps to cut global"),
    (["verify", "--warmup", "3"], "bigbatch verify does not use --warmup (bigbatch train does)"),
    (["verify", "--lr-scaling", "sqrt"], "bigbatch verify does not use --lr-scaling"),
    (["compare", "--accum-schedule", "ramp:8:64"], "bigbatch compare does not use"),
    (["plan", "--micro-batch", "4"], "bigbatch plan chooses the micro-batch and K itself"),
    (["train", "--lr", "-1"], "--lr must be a positive finite number"),
    (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["train", "--data", "/no/such/path"], "/no/such/path"),
    (["train", "--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
    (["verify", "--model", "nocolon"], "--model"),
    (["compare", "--global-batch", "8", "--micro-batch", "8"], "accum_steps of 2 or more"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--device", "tpu9"], "--device 'tpu9' is not a device"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert message in lines[0] and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, nothing else


def test_bad_config_files(tmp_path: Path) -> None:
    cases = {
        "unknown.yaml": ("steps: 2\nbatchsize: 4\n", "unknown key batchsize"),
        "broken.yaml": ("steps: [2\n", "cannot parse it"),
        "list.yaml": ("- 1\n- 2\n", "expected a mapping"),
        "typed.toml": ('steps = "many"\n', "--steps must be int, got 'many'"),
        "conf.ini": ("[x]\n", "unknown format"),
    }
    work = tmp_path / "work"
    work.mkdir()
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        r = run("train", "--config", str(path), cwd=work)
        assert r.returncode == 2, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (name, r.stderr)
    assert list(work.iterdir()) == []


def test_empty_data_and_existing_run_are_refused(tmp_path: Path, text: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("train", "--data", str(empty), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "holds no text" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()

    out = tmp_path / "run"
    args = ["train", "--data", str(text), "--steps", "1", "--global-batch", "4",
            "--micro-batch", "2", "--out", str(out), *TINY]
    assert run(*args).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = run(*args)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--overwrite" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "notes.txt").write_text("mine")
    r = run(*args, "--overwrite", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine"  # only run files are replaced
    assert (out / "metrics.jsonl").read_bytes() != before["metrics.jsonl"]


@pytest.mark.parametrize("command", ["train", "verify", "compare", "plan"])
def test_help(command: str) -> None:
    r = run(command, "--help")
    assert r.returncode == 0
    assert "--global-batch" in r.stdout and "--config" in r.stdout
    assert "batch:" in r.stdout and "model:" in r.stdout  # sectioned by config group
    if command != "train":  # each command lists the flags it uses, not train's
        assert "--save-every" not in r.stdout and "--accum-schedule" not in r.stdout


def test_installed_entry_points(tmp_path: Path) -> None:
    """The console script and ``python -m bigbatch`` reach the same parser, and a mistake there is
    one line with exit status 2."""
    script = Path(sys.executable).parent / "bigbatch"
    r = subprocess.run([str(script), "train", "--steps", "0"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == ("bigbatch: error: --steps must be "
                                                      "positive, got 0")
    r = run_process("verify", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "--normalization" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_plan_prints_a_command_that_runs_as_printed(tmp_path: Path, text: Path) -> None:
    r = run("plan", "--data", str(text), "--global-batch", "8", "--memory", "4GiB",
            "--candidates", "4,8", "--repeats", "1", *MODEL)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("train with: "))
    command = line.removeprefix("train with: ").split("  (")[0].split()
    assert command[:2] == ["bigbatch", "train"] and "None" not in command
    for measured in ("--seq-len", "--data", "--n-layer", "--d-model"):
        assert measured in command  # what was measured is what trains
    out = tmp_path / "run"
    r = run(*command[1:], "--steps", "1", "--eval-samples", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal exists only without CUDA")
def test_cuda_device_refused_without_cuda(tmp_path: Path) -> None:
    r = run("train", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr
