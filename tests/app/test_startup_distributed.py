"""The start-up header under torchrun: the global batch cut per rank × ranks, and FSDP2's noise
scale announced as not measured (2 ranks, gloo, on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--device",
        "cpu", "--eval-samples", "8", "--eval-every", "0", "--steps", "1"]


def test_header_under_torchrun_is_per_rank_and_says_fsdp2_measures_no_noise_scale(
        tmp_path: Path, text: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "bigbatch", "train", "--data", str(text), "--out", str(out), "--parallel", "fsdp2",
         "--global-batch", "32", "--micro-batch", "8", *TINY],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    head = r.stderr.split("\nstep ")[0]
    assert ("1 step of global batch 32 = 2 micro-batches of 8 × 32 bytes per rank × 2 ranks "
            "(fsdp2)") in head, head
    assert "noise scale: not measured under FSDP2" in head
    assert head.count("noise scale:") == 1  # rank 0 speaks for all
