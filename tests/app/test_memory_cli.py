"""Memory from the command line: ``bigbatch plan``, ``--micro-batch auto``, out-of-memory in a run,
and ``--checkpoint-activations``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import yaml
from runcli import run
from safetensors.torch import load_file

import bigbatch.app.trainer as trainer
import bigbatch.app.workload as workload
from bigbatch.app.config import TrainConfig
from bigbatch.app.runfolder import load_run_config
from bigbatch.memory import OutOfMemory

MODEL = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
         "--device", "cpu"]
TINY = [*MODEL, "--eval-samples", "16"]


def test_plan_prints_candidates_and_a_command(text: Path) -> None:
    r = run("plan", "--data", str(text), "--global-batch", "8", "--memory", "64GiB",
            "--repeats", "1", *MODEL)
    assert r.returncode == 0, r.stderr
    assert "| micro-batch | K | predicted peak |" in r.stdout
    for m, k in ((1, 8), (2, 4), (4, 2), (8, 1)):
        assert f"| {m} | {k} |" in r.stdout or f"| {m} ← | {k} |" in r.stdout
    assert "chosen: micro-batch" in r.stdout and "train with: bigbatch train" in r.stdout


def test_train_with_auto_micro_batch_records_the_choice(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--steps", "2", "--global-batch", "8",
            "--micro-batch", "auto", "--memory", "64GiB", "--eval-every", "0",
            "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    assert "--micro-batch auto: candidates" in r.stderr and "chosen: micro-batch" in r.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())["batch"]
    assert saved["micro_batch"] in (1, 2, 4, 8) and saved["global_batch"] == 8
    # a resumed run uses the recorded size (no second, possibly different, choice)
    assert load_run_config(out).plan().micro_batch == saved["micro_batch"]


@pytest.mark.parametrize("args,message", [
    (["plan", "--micro-batch", "4"], "chooses the micro-batch and K itself"),
    (["train", "--micro-batch", "auto", "--accum-steps", "2"], "drop --accum-steps"),
    (["train", "--micro-batch", "many"], "argument --micro-batch: needs int or 'auto'"),
    (["train", "--memory", "lots"], "--memory: memory size 'lots' is not a size"),
    (["verify", "--micro-batch", "auto"], "give a number here"),
    (["plan", "--candidates", "4,x"], "--candidates needs sizes"),
    (["train", "--micro-tokens", "16", "--seq-len", "32"], "is less than --seq-len 32"),
    (["train", "--micro-tokens", "256", "--accum-schedule", "0:4"], "give one of them"),
    (["train", "--micro-batch", "auto", "--micro-tokens", "256"], "give one of them"),
])
def test_bad_memory_options_are_one_line_errors(tmp_path: Path, args: list[str],
                                                message: str) -> None:
    r = run(*args, "--out", str(tmp_path / "x")) if args[0] == "train" else run(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_plan_help() -> None:
    r = run("plan", "--help")
    assert r.returncode == 0 and "--memory" in r.stdout and "--candidates" in r.stdout


def _config(out: Path, text: Path, **kw) -> TrainConfig:
    return TrainConfig.of(**{**dict(data=str(text), steps=3, global_batch=8, micro_batch=4,
                                 eval_every=0, eval_samples=16, n_layer=1, d_model=32, n_head=2,
                                 seq_len=32, device="cpu", dtype="float64", warmup=0,
                                 noise_scale=False, out=str(out)), **kw})


def test_out_of_memory_in_a_run_is_split_and_the_weights_are_unchanged(
        tmp_path: Path, text: Path, monkeypatch) -> None:
    clean = trainer.train(_config(tmp_path / "clean", text), stream=io.StringIO())
    real = workload.lm_loss

    def faulty(model, batch):  # any micro-batch of more than 2 rows runs out of memory
        if batch["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real(model, batch)

    monkeypatch.setattr(workload, "lm_loss", faulty)
    log = io.StringIO()
    split = trainer.train(_config(tmp_path / "split", text), stream=log)
    assert "ran out of memory and were split in two" in log.getvalue()
    assert "pieces of at most 2 rows" in log.getvalue()
    a = load_file(str(clean.out / "model.safetensors"))
    b = load_file(str(split.out / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-10 * a[name].abs().max(), name
    metrics = (split.out / "metrics.jsonl").read_text()
    assert '"oom_splits": 1' in metrics and '"max_rows": 2' in metrics


def test_a_sample_that_never_fits_stops_the_run_with_a_checkpoint(
        tmp_path: Path, text: Path, monkeypatch) -> None:
    def faulty(model, batch):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(workload, "lm_loss", faulty)
    with pytest.raises(trainer.RunStopped) as info:
        trainer.train(_config(tmp_path / "run", text), stream=io.StringIO())
    assert info.value.exit_code == 1
    assert "cannot be split further" in str(info.value) and "step-000000" in str(info.value)
    assert isinstance(info.value.__cause__, OutOfMemory)


def test_checkpointed_activations_train_the_same_weights(tmp_path: Path, text: Path,
                                                        monkeypatch) -> None:
    """With dropout, so the recomputation must replay the forward's masks; the negative twin
    recomputes without restoring the random state (other masks in backward) and ends elsewhere."""
    import functools

    import bigbatch.app.models.gpt as gpt

    # the command has no dropout flag: build its GPT with dropout 0.2
    monkeypatch.setattr(workload, "GPTConfig", functools.partial(gpt.GPTConfig, dropout=0.2))
    outs = {}
    for flag in (False, True):
        out = tmp_path / f"ckpt{flag}"
        trainer.train(_config(out, text, checkpoint_activations=flag), stream=io.StringIO())
        outs[flag] = load_file(str(out / "model.safetensors"))
    for name, w in outs[False].items():
        assert (w - outs[True][name]).abs().max() <= 1e-10 * w.abs().max(), name
    monkeypatch.setattr(gpt, "checkpoint", functools.partial(gpt.checkpoint,
                                                             preserve_rng_state=False))
    out = tmp_path / "no-replay"
    trainer.train(_config(out, text, checkpoint_activations=True), stream=io.StringIO())
    bad = load_file(str(out / "model.safetensors"))
    assert max(float((w - bad[n]).abs().max() / w.abs().max())
               for n, w in outs[False].items()) > 1e-3


def test_packing_by_tokens_trains_the_same_weights_with_fewer_padded_tokens(
        tmp_path: Path) -> None:
    import json
    import sysconfig

    lines = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    data = tmp_path / "lines.jsonl"  # one sample per source line: 2 to 33 bytes
    data.write_text("".join(json.dumps({"text": x}) + "\n" for x in lines if len(x) > 1))
    fixed = trainer.train(_config(tmp_path / "fixed", data, pack="none"), stream=io.StringIO())
    log = io.StringIO()
    packed = trainer.train(_config(tmp_path / "packed", data, micro_tokens=64, pack="tokens"),
                           stream=log)
    a = load_file(str(fixed.out / "model.safetensors"))
    b = load_file(str(packed.out / "model.safetensors"))
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-10 * a[name].abs().max(), name
    steps = [json.loads(x) for x in (packed.out / "metrics.jsonl").read_text().splitlines()]
    ks = [x["micro_batches"] for x in steps if x["kind"] == "train"]
    assert all(1 <= k for k in ks) and ks != [2] * len(ks)  # K follows the lengths
    assert "| K " in log.getvalue()
