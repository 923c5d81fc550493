"""What ``bigbatch train`` says before its first step describes the run that runs: the batches of
the first step under a schedule, the per-rank cut, whether the noise scale is measured, the epochs,
a warning for data smaller than one global batch, a note for bf16 without fast bf16; and the
settings that would run but silently do nothing (adaptive K without a noise scale) are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runcli import run

from bigbatch.app import startup
from bigbatch.app.startup import RunShape, batch_line, data_lines, noise_line
from bigbatch.schedule import parse_accum_schedule

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
        "--device", "cpu", "--eval-samples", "8", "--eval-every", "0"]


def train(tmp_path: Path, text: Path, *args: str) -> tuple[int, list[str], Path]:
    """``bigbatch train`` in this process: exit code, the stderr lines before step 1, run folder."""
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), *TINY, *args)
    head = r.stderr.split("\nstep ")[0].splitlines()
    return r.returncode, head if r.returncode == 0 else r.stderr.splitlines(), out


def ks(out: Path) -> list[int]:
    return [x["accum_steps"] for x in map(json.loads, (out / "metrics.jsonl").open())
            if x["kind"] == "train"]


def shape(world: int = 1) -> RunShape:
    return RunShape(steps=10, global_batch=32, micro_batch=8, world_size=world, parallel="ddp",
                    sample="32 bytes")


# -- item 5: adaptive K needs the noise scale; the header says whether it is measured ----------

@pytest.mark.parametrize("flags", [["--parallel", "fsdp2"], ["--no-noise-scale"]])
def test_adaptive_without_a_noise_scale_is_refused_in_one_line(tmp_path: Path, text: Path,
                                                               flags: list[str]) -> None:
    code, lines, out = train(tmp_path, text, "--steps", "1", "--accum-schedule", "adaptive:2:8:1",
                             *flags)
    assert code == 2 and len(lines) == 1, lines
    assert "noise scale" in lines[0] and flags[-1] in lines[0]
    assert not out.exists()


def test_header_says_whether_the_noise_scale_is_measured(tmp_path: Path, text: Path) -> None:
    code, head, _ = train(tmp_path, text, "--steps", "1", "--global-batch", "4",
                          "--micro-batch", "2")
    assert code == 0 and head[1].startswith("noise scale: measured every step"), head
    code, head, _ = train(tmp_path, text, "--steps", "1", "--global-batch", "4",
                          "--micro-batch", "2", "--no-noise-scale", "--overwrite")
    assert code == 0 and "noise scale: off (--no-noise-scale)" in head, head
    assert noise_line(enabled=True, fsdp=True, most_micro_batches=8).startswith(
        "noise scale: not measured under FSDP2")
    assert "not measured" in noise_line(enabled=True, fsdp=False, most_micro_batches=1)


# -- item 6: adaptive keeps K >= 2 ------------------------------------------------------------

def test_adaptive_minimum_below_two_is_refused_in_one_line(tmp_path: Path, text: Path) -> None:
    code, lines, out = train(tmp_path, text, "--steps", "1", "--accum-schedule", "adaptive:1:8:1")
    assert code == 2 and len(lines) == 1, lines
    assert "KMIN must be at least 2" in lines[0] and "adaptive:2:8:1" in lines[0]
    assert not out.exists()


def test_adaptive_measures_every_step_and_never_takes_one_micro_batch(tmp_path: Path,
                                                                      text: Path) -> None:
    code, _, out = train(tmp_path, text, "--steps", "6", "--global-batch", "8",
                         "--micro-batch", "2", "--accum-schedule", "adaptive:2:4:1")
    assert code == 0
    records = [x for x in map(json.loads, (out / "metrics.jsonl").open()) if x["kind"] == "train"]
    assert all(x["accum_steps"] >= 2 for x in records)
    assert all(x["noise_trace"] is not None for x in records)  # measured on every step


# -- item 7: the header describes the steps that run ------------------------------------------

def test_header_of_a_ramp_shows_the_first_steps_batch(tmp_path: Path, text: Path) -> None:
    code, head, out = train(tmp_path, text, "--steps", "3", "--accum-schedule", "ramp:8:128")
    assert code == 0
    assert ("3 steps; global batch 8 = 1 micro-batch of 8 × 32 bytes at the start, ramped up to "
            "32 = 4 micro-batches over the first 128 samples") in head[0], head
    assert ks(out) == [1, 1, 1]  # what the header said


def test_header_says_one_step_and_one_micro_batch_in_the_singular(tmp_path: Path,
                                                                  text: Path) -> None:
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), *TINY, "--steps", "1",
            "--global-batch", "8", "--micro-batch", "8")
    assert r.returncode == 0, r.stderr
    assert "1 step of global batch 8 = 1 micro-batch of 8 × 32 bytes" in r.stderr
    assert "1 steps" not in r.stderr + r.stdout and "1 micro-batches" not in r.stderr
    assert "; 1 step in " in r.stdout


def test_header_under_several_ranks_is_per_rank() -> None:
    line = batch_line(shape(world=2), None, None)
    assert line == ("10 steps of global batch 32 = 2 micro-batches of 8 × 32 bytes per rank × 2 "
                    "ranks (ddp)")
    table = parse_accum_schedule("0:2,5:4", micro_batch=8, world_size=2, k_final=2)
    assert batch_line(shape(world=2), table, "0:2,5:4") == (
        "10 steps; global batch 32 = 2 micro-batches of 8 × 32 bytes per rank × 2 ranks, then "
        "64 = 4 micro-batches per rank × 2 ranks after 5 steps (ddp; --accum-schedule 0:2,5:4)")
    adaptive = parse_accum_schedule("adaptive:2:8:3", micro_batch=8, world_size=1, k_final=4)
    assert batch_line(shape(), adaptive, "adaptive:2:8:3").startswith(
        "10 steps; global batch 32 = 4 micro-batches of 8 × 32 bytes at the start, then K from "
        "2 to 8 (global batch 16 to 64) following the noise scale, changed at most every 3 steps")


# -- item 8: bf16 on a CPU without fast bf16 ---------------------------------------------------

@pytest.mark.parametrize(("flags", "slow"), [({"avx2"}, True), ({"avx2", "avx512_bf16"}, False),
                                             ({"amx_bf16"}, False)])
def test_bf16_on_a_cpu_without_fast_bf16_says_so(tmp_path: Path, text: Path, flags: set[str],
                                                 slow: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "_cpu_flags", lambda: frozenset(flags))
    code, head, _ = train(tmp_path, text, "--steps", "1", "--global-batch", "8",
                          "--precision", "bf16")
    assert code == 0
    notes = [line for line in head if "no fast bfloat16" in line]
    assert len(notes) == int(slow), head
    if slow:
        assert notes[0].startswith("note: ") and "--precision fp32" in notes[0]


# -- item 9: the epochs, and data smaller than one global batch --------------------------------

def test_three_records_warn_that_one_global_batch_repeats_them(tmp_path: Path) -> None:
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n"
                            for t in ("hello world one", "second record here", "third")))
    out = tmp_path / "run"
    r = run("train", "--data", str(data), "--out", str(out), *TINY, "--steps", "3")
    assert r.returncode == 0, r.stderr
    head = r.stderr.split("\nstep ")[0]
    assert ("data: 2 training samples, 1 for validation; the run takes 96 samples = 48 epochs"
            in head)
    assert ("warning: the training data holds 2 samples, fewer than one global batch (32)"
            in head)


def test_header_says_how_many_epochs(tmp_path: Path, text: Path) -> None:
    code, head, _ = train(tmp_path, text, "--steps", "2", "--global-batch", "8")
    assert code == 0
    assert any(line.startswith("data: ") and "the run takes 16 samples = " in line
               and line.endswith(" epochs") for line in head), head
    assert not any(line.startswith("warning:") for line in head)
    assert data_lines(100, 5, (250, 250), 32) == [
        "data: 100 training samples, 5 for validation; the run takes 250 samples = 2.5 epochs"]
    assert data_lines(10, 1, (10, 10), 8)[0].endswith("10 samples = 1 epoch")
    assert data_lines(10_000, 1, (16, 64), 8)[0].endswith("16 to 64 samples = 0.0016 to "
                                                           "0.0064 epochs")
