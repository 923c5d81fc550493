"""Smoke test of benchmarks/memory_k.py: its --quick run writes the JSON and the PNG.

Only the shape of the report is checked, never a time or a memory value.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "memory_k.py"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="CPU peaks are read from Linux's /proc/self")
def test_quick_run_writes_json_and_png(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "memory_k.json", tmp_path / "memory_k.png"
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu",
                        "--json", str(out_json), "--png", str(out_png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert out_png.stat().st_size > 0
    report = json.loads(out_json.read_text())
    for key in ("device", "torch", "command", "model", "global_batch", "steps", "measures",
                "static", "target_ratio", "within_target", "rows", "configs"):
        assert key in report, key
    assert report["measures"] == ["live", "held"]
    assert set(report["static"]) == {"params", "grads", "optimizer_state", "total"}
    assert [row["k"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert {"k", "micro", "seconds_per_step", "live", "held"} <= set(row)
        for measure in ("live", "held"):
            assert {"single_peak_mib", "accumulated_peak_mib", "ratio", "vs_k1",
                    "single_increment_mib", "accumulated_increment_mib",
                    "accumulated_peak_abs_mib"} <= set(row[measure])
    assert "| K | micro |" in r.stdout
