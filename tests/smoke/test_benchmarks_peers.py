"""Smoke test of ``python -m benchmarks`` (benchmarks/peers.py): its --quick run writes the report.

Only the shape of the report is checked, and the correctness column's float64 distances; never a
time. Accelerate and Lightning are optional (the ``bench`` extra): without them the run skips
them with a note, and so does this test's check of their rows.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="CPU peaks are read from Linux's /proc/self")
def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "peers.json", tmp_path / "peers.png"
    models = "default,gpt2" if _installed("transformers") else "default"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu",
                        "--models", models, "--json", str(out_json), "--png", str(out_png)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert out_png.stat().st_size > 0
    report = json.loads(out_json.read_text())
    for key in ("command", "machine", "versions", "settings", "formulas", "skipped", "models",
                "markdown"):
        assert key in report, key
    peers = [p for p in ("accelerate", "lightning") if _installed(p)]
    for p in ("accelerate", "lightning"):
        assert (p in report["settings"]["methods"]) == (p in peers)
        assert (p in report["skipped"]) == (p not in peers)
    assert list(report["models"]) == models.split(",")
    for res in report["models"].values():
        assert {"description", "speed", "correctness", "memory"} <= set(res)
        assert [row["k"] for row in res["speed"]] == [1, 2]
        for row in res["speed"]:
            assert set(row["seconds"]) == {"hand", "hand2", "bigbatch", *peers}
            assert {"k", "micro", "timed_steps", "warmup", "ratio", "paired_ratio",
                    "rounds"} <= set(row)
        dist = res["correctness"]["distance"]
        assert set(dist) == {"hand", "bigbatch", *peers}
        assert dist["bigbatch"] < 1e-10  # float64: exact up to rounding
        for m in ("hand", *peers):  # mean loss / K on micro-batches of unequal token counts
            assert dist[m] > 1e-3, m
        assert [row["k"] for row in res["memory"]] == [1, 2]
        for row in res["memory"]:
            assert {"seconds", "peak_bytes", "start_bytes", "increment_bytes",
                    "measure"} <= set(row)
    assert "| model | method |" in r.stdout and "| model | K × micro-batch |" in r.stdout


def test_bad_flag_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--k", "0,8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--k" in r.stderr
    assert r.stdout == ""


def test_engine_profile_runs_on_tiny_settings() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.engine_profile", "--k", "1,2",
                        "--steps", "2", "--warmup", "1", "--costs", "2", "--profile", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for loop in ("hand", "hand2", "exact", "exact-fused", "bigbatch", "bigbatch-raise"):
        assert f"| {loop} |" in r.stdout, loop
    assert "excess over hand = a + b·K" in r.stdout and "cProfile" in r.stdout
