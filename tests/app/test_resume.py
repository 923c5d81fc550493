"""Crash-safe training: kills at random moments, signals, corrupt checkpoints, bad numbers."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from runcli import run
from safetensors.torch import load_file

import bigbatch.app.trainer as trainer
import bigbatch.app.workload as workload
from bigbatch.app.checkpoint import list_checkpoints, load_checkpoint
from bigbatch.app.config import TrainConfig
from bigbatch.loss import LossSum

pytestmark = [pytest.mark.slow]

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
        "--eval-samples", "8", "--eval-every", "10", "--device", "cpu", "--global-batch", "8",
        "--micro-batch", "2", "--warmup", "2"]


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((stdlib / "textwrap.py").read_bytes())
    return path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bigbatch", "train", *args]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def train_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert train_losses(a) == train_losses(b)


def test_the_same_command_after_sigkills_from_process_start_is_bitwise_exact(
        tmp_path: Path, text: Path) -> None:
    """20 SIGKILLs at random moments from process start — some before the first checkpoint,
    some while one is written, some after the model is written — each followed by the SAME
    command line (``--resume auto``): every run ends with the weights and losses of the run that
    was never interrupted, bit for bit, and some of the restarts provably continue a cycle from a
    mid-cycle checkpoint.

    A restart may finish before its kill comes (it has less left to do), or find the run
    finished (killed after writing the model); then the next kills go to a fresh folder: the
    same command, one more episode, until 20 kills have landed and a mid-cycle resume was seen.
    """
    args = ["--data", str(text), "--steps", "24", "--save-every-micro", "3", "--keep", "2",
            "--accum-schedule", "0:2,8:4,16:6", "--lr-scaling", "linear", *TINY,
            "--n-layer", "2", "--d-model", "64", "--seq-len", "64"]  # training ~1/4 of a run
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    done = subprocess.run(command(*args, "--out", str(ref)), capture_output=True, text=True)
    total = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr

    rng = random.Random(20261202)
    kills, runs, episodes, resumed_from = 0, 0, 0, []
    mid: list[str] = []
    while kills < 20 or not mid:
        episodes += 1
        out = tmp_path / f"killed-{episodes}"
        same = command(*args, "--out", str(out), "--resume", "auto")
        while True:
            proc = subprocess.Popen(same, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            began = time.perf_counter()
            killed = False
            try:
                proc.wait(timeout=rng.uniform(0.05, 1.0) * total)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                kills, killed = kills + 1, True
            _, err = proc.communicate()
            resumed_from += [line for line in err.splitlines() if line.startswith("resuming from")]
            runs += 1
            assert runs < 200, (kills, resumed_from)
            if killed:
                assert proc.returncode == -signal.SIGKILL, err
                total = max(total, time.perf_counter() - began)
                continue
            if proc.returncode == 2 and "holds this run, finished" in err:
                break  # the last kill came after the run wrote its model: nothing left to do
            assert proc.returncode == 0, err
            break
        assert_bitwise_equal(out, ref)
        mid = [r for r in resumed_from if not r.endswith("micro-batch 0")]
    # the finished run is refused by the same command, in one line, with what to do
    again = subprocess.run(same, capture_output=True, text=True)
    assert again.returncode == 2 and "holds this run, finished (24 steps)" in again.stderr


def test_resume_before_the_first_checkpoint_starts_the_recorded_run(tmp_path: Path,
                                                                    text: Path) -> None:
    """A run stopped after writing its config but before any checkpoint resumes from step 0 with
    its recorded configuration and seed, bitwise the run that was never stopped."""
    args = ["--data", str(text), "--steps", "3", "--seed", "7", *TINY]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert subprocess.run(command(*args, "--out", str(ref)), capture_output=True).returncode == 0
    assert subprocess.run(command(*args, "--out", str(out)), capture_output=True).returncode == 0
    shutil.rmtree(out / "checkpoints")  # as if killed before the first one
    (out / "model.safetensors").unlink()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')  # half a line's worth
    r = subprocess.run(command("--resume", str(out)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "no checkpoint yet" in r.stderr and "starting the run from step 0" in r.stderr
    assert_bitwise_equal(out, ref)


def test_one_writer_per_run_folder(tmp_path: Path, text: Path) -> None:
    """A second process on a run folder in use is refused at start, with the writer's pid; a
    SIGKILLed writer leaves no lock behind."""
    args = ["--data", str(text), "--steps", "20000", "--save-every", "1", *TINY]  # never ends
    out = tmp_path / "run"
    first = subprocess.Popen(command(*args, "--out", str(out), "--resume", "auto"),
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints"):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    for second in (command(*args, "--out", str(out), "--resume", "auto"),
                   command("--resume", str(out))):
        r = subprocess.run(second, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"bigbatch: error: {out} is being written by process "
                                    f"{first.pid} (another bigbatch train); wait for it to end "
                                    "or stop it, then run this again")
    first.send_signal(signal.SIGKILL)
    first.communicate()
    resumed = subprocess.Popen(command("--resume", str(out)), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    before = list_checkpoints(out / "checkpoints")[-1].name  # --keep rotates: watch the newest
    while resumed.poll() is None and list_checkpoints(out / "checkpoints")[-1].name == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resumed.send_signal(signal.SIGTERM)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 128 + signal.SIGTERM, err
    assert "resuming from" in err


def test_resume_auto_refuses_another_run_in_one_line(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", str(text), "--steps", "2", *TINY, "--out", str(out)]
    assert subprocess.run(command(*args), capture_output=True).returncode == 0
    r = subprocess.run(command(*args, "--lr", "1e-4", "--resume", "auto"), capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "holds another run: --lr 0.0001 (the run has 0.003)" in r.stderr
    r = subprocess.run(command("--data", str(text), "--resume", "auto"), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "give --out DIR" in r.stderr
    mine = tmp_path / "mine"  # a folder of the user's own files, no run in it: left untouched
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "weights.bin").write_bytes(b"precious")
    r = subprocess.run(command("--data", str(text), "--out", str(mine), "--resume", "auto"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is not empty" in r.stderr, r.stderr
    assert (mine / "model" / "weights.bin").read_bytes() == b"precious"


@pytest.mark.parametrize("times", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_checkpoint_and_resume_line(tmp_path: Path, text: Path,
                                                      sig: signal.Signals, times: int) -> None:
    """One signal, or the same one twice at once (a scheduler signalling every process of the
    job): either way the run stops with a checkpoint and says how to resume."""
    args = ["--data", str(text), "--steps", "400", *TINY]
    out = tmp_path / "run"
    proc = subprocess.Popen(command(*args, "--out", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").stat().st_size:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    for _ in range(times):
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    last = err.strip().splitlines()[-1]
    assert f"stopped by {sig.name}" in last and f"bigbatch train --resume {out}" in last
    assert list_checkpoints(out / "checkpoints")
    assert not (out / "model.safetensors").exists()


def test_corrupt_newest_checkpoint_falls_back_and_stays_exact(tmp_path: Path,
                                                              text: Path) -> None:
    base = ["--data", str(text), "--save-every", "2", "--keep", "3",
            "--accum-schedule", "adaptive:2:6:2", *TINY]
    ref = tmp_path / "ref"
    assert subprocess.run(command(*base, "--steps", "6", "--out", str(ref)),
                          capture_output=True).returncode == 0
    out = tmp_path / "run"
    assert subprocess.run(command(*base, "--steps", "6", "--out", str(out)),
                          capture_output=True).returncode == 0
    (out / "model.safetensors").unlink()
    ckpts = list_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000002-micro-0000", "step-00000004-micro-0000",
                                       "step-00000006-micro-0000"]
    tensors = ckpts[-1] / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensors.write_bytes(bytes(data))
    (ckpts[-2] / "manifest.json").unlink()
    r = subprocess.run(command("--resume", str(out)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "step-00000006-micro-0000 is unusable" in r.stderr and "checksum" in r.stderr
    assert "resuming from step-00000002-micro-0000" in r.stderr
    assert_bitwise_equal(out, ref)
    # the damaged ones were moved aside, not deleted, and good ones were written in their place
    aside = sorted(p.name for p in (out / "checkpoints").glob(".rejected-*"))
    assert [n.rsplit("-", 1)[0] for n in aside] == [".rejected-step-00000004-micro-0000",
                                                   ".rejected-step-00000006-micro-0000"]
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == [
        c.name for c in list_checkpoints(ref / "checkpoints")]


def test_resume_errors(tmp_path: Path, text: Path) -> None:
    r = subprocess.run(command("--resume", str(tmp_path / "none")), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no config.yaml there" in r.stderr
    r = subprocess.run(command("--resume", str(tmp_path), "--lr", "0.1"), capture_output=True,
                       text=True)
    assert r.returncode == 2 and "drop --lr" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _config(text: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig.of(data=str(text), out=str(out), n_layer=1, d_model=32, n_head=2,
                       seq_len=32, global_batch=8, micro_batch=2, eval_samples=8, device="cpu",
                       **kw)


def _nan_at(step_to_poison: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the loss of one micro-batch of optimizer step ``step_to_poison`` (1-based) NaN."""
    calls = {"n": 0}
    real = workload.lm_loss

    def poisoned(model, batch):
        calls["n"] += 1
        ls = real(model, batch)
        if (calls["n"] - 1) // 4 + 1 == step_to_poison and calls["n"] % 4 == 2:
            return LossSum(ls.sum * float("nan"), ls.count)
        return ls

    monkeypatch.setattr(workload, "lm_loss", poisoned)


def test_nonfinite_skip_leaves_the_step_out(tmp_path: Path, text: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(3, monkeypatch)
    out = tmp_path / "run"
    trainer.train(_config(text, out, steps=5, save_every=1, keep=10),
                  stream=open("/dev/null", "w"))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [False, False, True, False, False]
    assert train[2]["skip_reason"] == "non-finite loss"
    # step 3 changed nothing: weights, optimizer moments and scheduler as after step 2 ...
    after = [load_checkpoint(c) for c in list_checkpoints(out / "checkpoints")]
    two, three, four = after[1], after[2], after[3]
    assert two["step"] == 2 and three["step"] == 3
    for part in ("model", "optimizer", "scheduler"):
        assert _same(two[part], three[part]), part
    # ... and step 4 did train
    assert not _same(three["model"], four["model"])


def _same(a, b) -> bool:
    """Bitwise equality of two nested states."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_nonfinite_stop_saves_last_good_state(tmp_path: Path, text: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_at(3, monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(trainer.RunStopped, match="stopped: non-finite loss") as e:
        trainer.train(_config(text, out, steps=5, on_nonfinite="stop"),
                      stream=open("/dev/null", "w"))
    assert e.value.exit_code == 1
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == [
        "step-00000002-micro-0000"]
    # the saved weights are those after step 2: a clean run of 2 steps gives the same
    monkeypatch.undo()
    trainer.train(_config(text, tmp_path / "two", steps=2), stream=open("/dev/null", "w"))
    saved = load_checkpoint(list_checkpoints(out / "checkpoints")[0])["model"]
    clean = weights(tmp_path / "two")
    assert all(torch.equal(saved[k], clean[k]) for k in clean)


def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    trainer.train(_config(text, out, steps=2), stream=open("/dev/null", "w"))
    cfg = out / "config.yaml"
    cfg.write_text(cfg.read_text().replace("d_model: 32", "d_model: 64"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    r = subprocess.run(command("--resume", str(out)), capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not fit this run" in r.stderr and "config.yaml edited" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != ".lock"} == before


# -- a diverged run stops (--max-skips), and never exits 0 ---------------------------------------

def _tiny(text: Path, out: Path, *args: str) -> list[str]:
    return ["train", "--data", str(text), *TINY, "--out", str(out), *args]


def test_a_diverged_run_stops_after_max_skips_with_a_checkpoint(tmp_path: Path,
                                                                text: Path) -> None:
    out = tmp_path / "run"
    r = run(*_tiny(text, out, "--lr", "1e8", "--steps", "40", "--max-skips", "3"))
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("bigbatch: stopped: 3 optimizer steps in a row skipped "
                           "(--on-nonfinite skip), the --max-skips 3 limit"), last
    assert "raise --max-skips (0: no limit)" in last and "Traceback" not in r.stderr
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped"] for r in recs if r["kind"] == "train"]
    assert skipped[-3:] == [True] * 3 and len(skipped) < 40
    step = len(skipped)
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{step:08d}-micro-0000"
    assert not (out / "model.safetensors").exists()


def test_a_run_that_ends_on_a_nonfinite_loss_exits_1(tmp_path: Path, text: Path) -> None:
    r = run(*_tiny(text, tmp_path / "run", "--lr", "1e8", "--steps", "6", "--max-skips", "0"))
    assert r.returncode == 1, r.stderr
    assert "final validation loss is nan" in r.stderr and "lower --lr" in r.stderr


def test_nonfinite_stop_names_the_flags_a_cli_user_types(tmp_path: Path, text: Path) -> None:
    r = run(*_tiny(text, tmp_path / "run", "--lr", "1e8", "--steps", "6", "--on-nonfinite",
                   "stop"))
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "(--on-nonfinite skip)" in last and "Lower --lr" in last, last
    assert "on_nonfinite" not in r.stderr


# -- a run made longer: --resume RUN --steps N ---------------------------------------------------

def test_raising_steps_on_resume_extends_the_run_bitwise(tmp_path: Path, text: Path) -> None:
    """A finished run of 3 steps extended to 5 is bitwise the run of 5 steps (with a schedule
    that does not depend on the total); config.yaml gets the new total, the rest as it was."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    constant = ("--schedule", "constant")
    assert run(*_tiny(text, ref, *constant, "--steps", "5")).returncode == 0
    assert run(*_tiny(text, out, *constant, "--steps", "3")).returncode == 0
    config = out / "config.yaml"
    config.write_text("# my note\n" + config.read_text())
    before = config.read_text().splitlines()
    r = run("train", "--resume", str(out), "--steps", "5")
    assert r.returncode == 0, r.stderr
    assert "extending the run from 3 to 5 steps" in r.stderr
    after = config.read_text().splitlines()
    assert [a for a, b in zip(before, after) if a != b] == ["  steps: 3"]
    assert [b for a, b in zip(before, after) if a != b] == ["  steps: 5"]
    assert_bitwise_equal(out, ref)
    # the same command again: finished, nothing to continue; fewer steps: refused
    r = run("train", "--resume", "auto", *_tiny(text, out, *constant, "--steps", "5")[1:])
    assert r.returncode == 2 and "finished (5 steps)" in r.stderr, r.stderr
    r = run("train", "--resume", str(out), "--steps", "4")
    assert r.returncode == 2 and "can only be extended; give --steps 5 or more" in r.stderr


def test_resume_auto_with_more_steps_extends_the_run(tmp_path: Path, text: Path) -> None:
    """``--resume auto`` treats the run's own flags with --steps raised as that run, extended,
    as ``--resume RUN --steps N`` does."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    args = ("--schedule", "constant", "--steps")
    assert run(*_tiny(text, ref, *args, "4")).returncode == 0
    assert run(*_tiny(text, out, *args, "2")).returncode == 0
    r = run("train", "--resume", "auto", *_tiny(text, out, *args, "4")[1:])
    assert r.returncode == 0, r.stderr
    assert "steps: 4" in (out / "config.yaml").read_text()
    assert_bitwise_equal(out, ref)


def test_raising_steps_of_a_decaying_schedule_is_refused(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    assert run(*_tiny(text, out, "--steps", "2")).returncode == 0  # cosine, the default
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    for words in (("--resume", str(out), "--steps", "4"),
                  ("--resume", "auto", *_tiny(text, out, "--steps", "4")[1:])):
        r = run("train", *words)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--schedule cosine decays the learning rate over its 2 steps" in r.stderr
        assert "start a new run" in r.stderr
    r = run("train", "--resume", str(out), "--lr", "1", "--steps", "4")
    assert r.returncode == 2 and "only --steps may be raised); drop --lr" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != ".lock"} == before


# -- the data a run started with -----------------------------------------------------------------

def test_resume_refuses_changed_data_naming_the_file(tmp_path: Path, text: Path) -> None:
    """An edit that keeps the file's size and time is still seen; a folder names the file."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        shutil.copy(text, folder / name)
    out = tmp_path / "run"
    assert run(*_tiny(folder, out, "--steps", "2", "--save-every", "1")).returncode == 0
    (out / "model.safetensors").unlink()
    shutil.rmtree(list_checkpoints(out / "checkpoints")[-1])  # as if stopped at step 1
    b = folder / "b.txt"
    stat = b.stat()
    data = bytearray(b.read_bytes())
    data[100] ^= 1
    b.write_bytes(bytes(data))
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    r = run("train", "--resume", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"the data changed since the run started: --data {b} (changed)" in r.stderr
    assert "a.txt" not in r.stderr and "start a new run" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != ".lock"} == before
    b.write_bytes(bytes(data[:100]) + bytes([data[100] ^ 1]) + bytes(data[101:]))  # put back
    r = run("train", "--resume", str(out))
    assert r.returncode == 0, r.stderr


def test_a_run_folder_without_a_fingerprint_still_resumes(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    assert run(*_tiny(text, out, "--steps", "2", "--save-every", "1")).returncode == 0
    assert json.loads((out / "fingerprint.json").read_text())["data"]["path"] == str(text)
    (out / "fingerprint.json").unlink()  # as written by an older bigbatch
    (out / "model.safetensors").unlink()
    shutil.rmtree(list_checkpoints(out / "checkpoints")[-1])
    r = run("train", "--resume", str(out))
    assert r.returncode == 0, r.stderr
