"""Resume under torchrun: mid-cycle checkpoints of 2 DDP ranks (each its own partial cycle, one
checkpoint), killed and resumed bitwise on 2 ranks and, falling back to the step boundary, on 1;
resume across world sizes 2→1 and 1→2 at step boundaries; SIGTERM to the group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.app.checkpoint import list_checkpoints, load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
        "--eval-samples", "8", "--eval-every", "0", "--device", "cpu", "--global-batch", "16",
        "--micro-batch", "2", "--warmup", "2", "--dtype", "float64", "--no-noise-scale"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(*args: str, world: int = 1) -> list[str]:
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    return [*head, "-m", "bigbatch", "train", *args]


def run(*args: str, world: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(launch(*args, world=world), capture_output=True, text=True,
                          timeout=600, env=ENV)


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, … (Linux ``/proc``): torchrun starts each rank in a
    session of its own, so killing torchrun's process group leaves the ranks running."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all(pid: int, timeout: float = 60) -> None:
    """SIGKILL torchrun and every rank at once, and wait until none runs any more."""
    family = [pid, *descendants(pid)]
    for p in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for p in family:
        while Path(f"/proc/{p}").exists() and "zombie" not in _state(p):
            assert time.monotonic() < deadline, f"process {p} still alive"
            time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "zombie"  # gone


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes())
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = run("--data", str(corpus), "--steps", "6", "--out", str(out), *TINY, world=2)
    assert r.returncode == 0, r.stderr
    return out


def test_mid_cycle_kill_resumes_bitwise_on_two_ranks_and_falls_back_on_one(
        tmp_path: Path, corpus: Path, reference: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", str(corpus), "--steps", "6", "--save-every-micro", "3", "--save-every", "1",
            "--keep", "2", "--out", str(out), *TINY]
    proc = subprocess.Popen(launch(*args, world=2), stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)
    deadline = time.monotonic() + 300
    def mid_cycle() -> list[Path]:  # noqa: E306
        return [p for p in list_checkpoints(out / "checkpoints") if not p.name.endswith("0000")]
    while not [p for p in mid_cycle() if not p.name.startswith("step-00000000")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    kill_all(proc.pid)  # torchrun and both ranks, mid-run: none left writing a checkpoint
    proc.wait()
    newest = list_checkpoints(out / "checkpoints")[-1]
    state = load_checkpoint(newest)
    if state["micro"]:  # one checkpoint holding each rank's own partial cycle
        assert len(state["ranks"]) == 2
        a, b = (r["accumulator"] for r in state["ranks"])
        assert a["micro"] == b["micro"] == state["micro"]
        assert any(not torch.equal(x, y) for x, y in zip(a["grads"], b["grads"])
                   if x is not None)  # two ranks, two different partial gradients
    copy, only_mid = tmp_path / "copy", tmp_path / "only-mid"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    subprocess.run(["cp", "-r", str(out), str(only_mid)], check=True)
    for p in list_checkpoints(only_mid / "checkpoints"):
        if p.name.endswith("0000"):
            shutil.rmtree(p)
    if list_checkpoints(only_mid / "checkpoints"):  # mid-cycle ones only: 1 process cannot use
        before = sorted(p.name for p in (only_mid / "checkpoints").iterdir())
        r = run("--resume", str(only_mid))
        assert r.returncode == 2 and r.stderr.count("error") == 1, r.stderr
        assert "fits this run" in r.stderr and "none at a step boundary" in r.stderr
        assert sorted(p.name for p in (only_mid / "checkpoints").iterdir()) == before
    # on 2 ranks: continues the cycle, bit for bit
    r = run("--resume", str(out), world=2)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    wa, wb = weights(out), weights(reference)
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    # on 1 process: the mid-cycle checkpoints are passed over (one line says so), exact to 1e-10
    r = run("--resume", str(copy))
    assert r.returncode == 0, r.stderr
    if state["micro"]:
        assert "taken mid-cycle by 2 rank(s), and this run has 1" in r.stderr
        assert "micro-batch 0" in r.stderr
    assert rel(weights(copy), wb) <= 1e-10


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_across_world_sizes_at_step_boundaries(first: int, then: int, tmp_path: Path,
                                                      corpus: Path, reference: Path) -> None:
    out = tmp_path / "run"
    r = run("--data", str(corpus), "--steps", "6", "--save-every", "3", "--out", str(out),
            *TINY, world=first)
    assert r.returncode == 0, r.stderr
    for late in list_checkpoints(out / "checkpoints"):
        if not late.name.startswith("step-00000003"):
            subprocess.run(["rm", "-r", str(late)], check=True)
    (out / "model.safetensors").unlink()
    r = run("--resume", str(out), world=then)
    assert r.returncode == 0, r.stderr
    assert "resuming from step-00000003-micro-0000" in r.stderr
    assert rel(weights(out), weights(reference)) <= 1e-10


def test_sigterm_to_the_group_checkpoints_every_rank_and_says_how_to_resume(
        tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(launch("--data", str(corpus), "--steps", "400", "--out", str(out),
                                   *TINY, world=2), stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not metrics.exists() or metrics.stat().st_size == 0:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does: every process of the job
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in err and "resume with: torchrun --nproc-per-node 2" in err
    assert f"--resume {out}" in err
    state = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert len(state["ranks"]) == 2  # both ranks' states are in it
