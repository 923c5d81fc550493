"""Data parallel: 2 simulated CPU devices, and 2 processes with ``jax.distributed``, equal to one
device and to the full batch (float64, 1e-10 of the update); sums and counts reduced once per
cycle, outside the micro-batch loop.

Each run is a fresh process (``tests/support/jax_devices_worker.py``): the device count is fixed
when JAX starts.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

pytestmark = [pytest.mark.slow]

WORKER = Path(__file__).resolve().parents[1] / "support" / "jax_devices_worker.py"


def reply(out: str) -> dict[str, Any]:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_two_devices_equal_one_and_the_full_batch() -> None:
    r = subprocess.run([sys.executable, str(WORKER), "mesh"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = reply(r.stdout)
    assert out["devices"] == 2
    assert out["vs_full"] < 1e-10 and out["vs_one_device"] < 1e-10
    # every all-reduce in the entry computation (none in the scan's loop), as many for K=2 as K=4
    assert set(out["all_reduces"]["2"]) == {"ENTRY"}
    assert out["all_reduces"]["2"] == out["all_reduces"]["4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_equal_the_full_batch() -> None:
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), "process", str(rank), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, stderr
        outs.append(reply(stdout))
    for out in outs:
        assert out["processes"] == 2 and out["devices"] == 2
        assert out["vs_full"] < 1e-10
    assert outs[0]["counts"] == outs[1]["counts"]
