"""``--early-stop PATIENCE``: the run stops after that many evaluations without a better
validation loss, exit 0 with one line; ``best/`` holds the best step's weights; the state is in
every checkpoint, so a resumed run stops at the same step with the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from runcli import run
from safetensors.torch import load_file

from bigbatch.app.checkpoint import load_checkpoint

# a learning rate high enough that the validation loss turns up within a few steps
RUN = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--device", "cpu",
       "--eval-samples", "16", "--global-batch", "8", "--micro-batch", "4", "--steps", "14",
       "--lr", "0.03", "--warmup", "0", "--schedule", "constant", "--eval-every", "1",
       "--early-stop", "2", "--save-every", "1", "--keep", "50", "--log-to", "none",
       "--no-noise-scale"]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_early_stop_needs_evaluations(tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), "--early-stop", "3",
            "--eval-every", "0", "--steps", "2", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--early-stop 3" in r.stderr and "--eval-every N" in r.stderr
    assert not out.exists()


def test_stops_early_keeps_the_best_and_resumes_to_the_same_stop(tmp_path: Path,
                                                                 text: Path) -> None:
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), *RUN)
    assert r.returncode == 0, r.stderr
    evals = [x for x in records(out) if x["kind"] == "eval"]
    losses = [x["val_loss"] for x in evals]
    best = min(range(len(losses)), key=losses.__getitem__)  # the first minimum
    stop = evals[-1]["step"]
    # it stopped two evaluations after the best, before its 14 steps
    assert stop == evals[best]["step"] + 2 < 14
    assert max(x["step"] for x in records(out) if x["kind"] == "train") == stop
    lines = [line for line in r.stderr.splitlines() if line.startswith("early stop")]
    assert lines == [f"early stop at step {stop} of 14: the validation loss has not improved for "
                     f"2 evaluations; best step {evals[best]['step']} (validation loss "
                     f"{losses[best]:.4f}), its weights in best/"]
    assert f"{stop} steps in" in r.stdout
    # best/ holds the weights of the best step (its checkpoint's), not the last ones
    info = json.loads((out / "best" / "best.json").read_text())
    assert info["step"] == evals[best]["step"] and info["val_loss"] == losses[best]
    kept = load_file(out / "best" / "model.safetensors")
    at_best = load_checkpoint(out / "checkpoints" / f"step-{info['step']:08d}-micro-0000")
    last = load_file(out / "model.safetensors")
    assert all(torch.equal(kept[k], at_best["model"][k]) for k in kept)
    assert any(not torch.equal(kept[k], last[k]) for k in kept)

    # interrupted after the best step, before the stop: resumed, it stops at the same step
    again = tmp_path / "again"
    shutil.copytree(out, again)
    for name in ("model.safetensors", "samples.md", "loss.png"):
        path = again / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(again / "checkpoints" / f"step-{stop:08d}-micro-0000")
    r2 = run("train", "--resume", str(again))
    assert r2.returncode == 0, r2.stderr
    assert f"resuming from step-{stop - 1:08d}-micro-0000" in r2.stderr
    timeless = [[{k: v for k, v in x.items() if k not in ("seconds", "tokens_per_s")}
                 for x in records(folder)] for folder in (out, again)]
    assert timeless[0] == timeless[1]
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert lines[0] in r2.stderr
    assert json.loads((again / "best" / "best.json").read_text()) == info

    # a finished early-stopped run resumed again trains no further
    r3 = run("train", "--resume", str(out))
    assert r3.returncode == 0, r3.stderr
    assert max(x["step"] for x in records(out) if x["kind"] == "train") == stop
