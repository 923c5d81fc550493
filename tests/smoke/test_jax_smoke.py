"""Smoke runs of the JAX port's benchmark (``python -m benchmarks jax --quick``) and Flax example
(``examples/jax_flax_lm.py --short``): they run and report; no time is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

pytest.importorskip("jax")
pytest.importorskip("optax")

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "jax.json", tmp_path / "jax.png"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "jax", "--quick", "--json", str(out),
                        "--png", str(png)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == "jax" and report["quick"] is True
    assert png.stat().st_size > 0
    names = {"hand", "hand2", "bigbatch", "bigbatch-stacked", "bigbatch-multi", "multisteps",
             "full"}
    assert set(report["speed"]["seconds"]) == names
    assert set(report["speed"]["paired_ratio"]) == names
    methods = [(row["k"], row["method"]) for row in report["memory"]["rows"]]
    assert methods == [(0, "full"), (1, "bigbatch"), (1, "hand"), (2, "bigbatch"), (2, "hand")]
    assert all(row["peak"] > 0 for row in report["memory"]["rows"])
    dist = report["distance"]
    assert dist["bigbatch"] < 1e-10 and dist["bigbatch-multi"] < 1e-10  # float64
    assert dist["hand"] > 1e-3 and dist["multisteps"] > 1e-3  # mean of micro-batch means
    assert "| method | ms/step |" in r.stdout and "| K × micro | method |" in r.stdout


def test_flax_example_short_run_learns() -> None:
    flax = pytest.importorskip("flax")
    assert flax
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "jax_flax_lm.py"), "--short"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    losses = [float(line.split()[3]) for line in r.stdout.splitlines()
              if line.startswith("step")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "validation loss" in r.stdout
