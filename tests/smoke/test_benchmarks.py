"""Smoke tests of the benchmarks: ``python -m benchmarks NAME --quick`` runs and writes its JSON.

Each benchmark runs once, in a subprocess from the repository root, with its results sent to a
temporary folder; only the shape of each report is checked, and the float64 distances of the
peers comparison — never a time. Accelerate, Lightning and transformers are optional (the
``bench`` extra): without them ``peers`` skips them with a note, and so does its check of their
rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("peers", "engine_profile", "memory_k", "packing", "attention_rows", "batchnorm_digits",
         "noise_overhead", "sync", "checkpoint_cost")
LINUX_PEAKS = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                 reason="CPU peaks are read from Linux's /proc/self")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def bench(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def quick(name: str, tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """Run NAME --quick with its JSON in ``tmp_path``; the report (common keys checked) and
    stdout."""
    out = tmp_path / f"{name}.json"
    r = bench(name, "--quick", "--json", str(out), *extra)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["benchmark"] == name
    assert report["command"].startswith(f"python -m benchmarks {name} --quick")
    assert report["quick"] is True and report["torch"] and report["date"]
    assert {"cpu", "cores", "torch_threads", "platform", "python"} <= set(report["machine"])
    return report, r.stdout


# -- the command ---------------------------------------------------------------------------------

def test_list_names_every_benchmark_and_no_child() -> None:
    for args in (["--list"], []):
        r = bench(*args)
        assert r.returncode == 0, r.stderr
        for name in NAMES:
            assert f"\n  {name} " in r.stdout, name
        assert "fullbatch_child" not in r.stdout


def test_unknown_name_is_one_line() -> None:
    r = bench("nosuch")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "nosuch" in r.stderr
    assert r.stdout == ""


def test_bad_flag_is_one_line() -> None:
    for args in (["peers", "--k", "0,8"], ["memory_k", "--no-such-flag"]):
        r = bench(*args)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"python -m benchmarks {args[0]}: ")
        assert r.stdout == ""


def test_quick_results_default_to_the_temporary_folder(tmp_path: Path) -> None:
    committed = ROOT / "benchmarks" / "results" / "checkpoint_cost.json"
    before = committed.read_bytes() if committed.exists() else None
    r = bench("checkpoint_cost", "--quick", env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "bigbatch-benchmarks" / "checkpoint_cost.json").read_text())
    assert report["quick"] is True
    assert (committed.read_bytes() if committed.exists() else None) == before


# -- each benchmark ------------------------------------------------------------------------------

@LINUX_PEAKS
def test_peers(tmp_path: Path) -> None:
    models = "default,gpt2" if _installed("transformers") else "default"
    png = tmp_path / "peers.png"
    report, stdout = quick("peers", tmp_path, "--device", "cpu", "--models", models,
                           "--png", str(png))
    assert png.stat().st_size > 0
    for key in ("command", "machine", "versions", "settings", "formulas", "skipped", "models",
                "markdown"):
        assert key in report, key
    package = {"accelerate": "accelerate", "lightning": "lightning", "hftrainer": "transformers"}
    peers = [p for p in package if _installed(package[p])]
    integrations = [f"{p}_bb" for p in peers]  # each peer with its bigbatch integration
    for p in package:
        assert (p in report["settings"]["methods"]) == (p in peers)
        assert (p in report["skipped"]) == (p not in peers)
    assert list(report["models"]) == models.split(",")
    for res in report["models"].values():
        assert {"description", "speed", "correctness", "memory"} <= set(res)
        assert [row["k"] for row in res["speed"]] == [1, 2]
        hf_hand = {"hand_hf"} if "hftrainer" in peers else set()  # the HF Trainer's group
        for row in res["speed"]:
            assert set(row["seconds"]) == {"hand", "hand2", "bigbatch", *peers, *integrations,
                                           *hf_hand}
            assert set(row["trainer_ratio"]) == set(integrations)
            assert {"k", "micro", "timed_steps", "warmup", "ratio", "paired_ratio",
                    "rounds"} <= set(row)
        dist = res["correctness"]["distance"]
        assert set(dist) == {"hand", "bigbatch", *peers, *integrations}
        for m in ("bigbatch", *integrations):  # float64: exact up to rounding
            assert dist[m] < 1e-10, m
        # mean loss / K on micro-batches of unequal token counts (the HF Trainer divides by its
        # own count of the cycle's labels, which is right on these pre-aligned labels)
        for m in ("hand", *(p for p in peers if p != "hftrainer")):
            assert dist[m] > 1e-3, m
        assert [row["k"] for row in res["memory"]] == [1, 2]
        for row in res["memory"]:
            assert {"seconds", "peak_bytes", "start_bytes", "increment_bytes",
                    "measure"} <= set(row)
    assert "| model | method |" in stdout and "| model | K × micro-batch |" in stdout


def test_engine_profile(tmp_path: Path) -> None:
    report, stdout = quick("engine_profile", tmp_path)
    loops = ("hand", "hand2", "exact", "exact-fused", "bigbatch", "bigbatch-stop")
    assert [row["k"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert tuple(row["loops"]) == loops
        for got in row["loops"].values():
            assert {"us_per_step", "excess_us_per_step", "excess_us_per_micro_batch", "ratio",
                    "paired_ratio"} <= set(got)
    assert tuple(report["fit"]) == loops
    assert report["costs_us"] and report["profile"]
    for loop in loops:
        assert f"| {loop} |" in stdout, loop
    assert "excess over hand = a + b·K" in stdout and "cProfile" in stdout


@LINUX_PEAKS
def test_memory_k(tmp_path: Path) -> None:
    png = tmp_path / "memory_k.png"
    report, stdout = quick("memory_k", tmp_path, "--device", "cpu", "--png", str(png))
    assert png.stat().st_size > 0
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
    assert "| K | micro |" in stdout


def test_packing(tmp_path: Path) -> None:
    png = tmp_path / "packing.png"
    report, stdout = quick("packing", tmp_path, "--png", str(png))
    assert png.stat().st_size > 0
    assert "| partition |" in stdout and "| rows |" in stdout and "| limit |" in stdout
    res = report["results"]
    arms = res["arms"]
    assert {"pad to max", "dynamic padding", "sorted in step", "tokens", "partition", "rows",
            "limit"} <= set(arms)
    budget = report["settings"]["token_budget"]
    for name in ("tokens", "partition", "rows", "sorted in step"):
        assert arms[name]["largest_micro_batch_positions"] <= budget, name
        assert arms[name]["same_samples_per_step"]
        assert arms[name]["update_diff_vs_pad_to_max"] < 1e-3  # same update, float32
    assert arms["rows"]["padding_fraction"] <= arms["pad to max"]["padding_fraction"]
    assert len(res["cost_model"]) == 3 and all(v >= 0 for v in res["cost_model"])


def test_attention_rows(tmp_path: Path) -> None:
    report, stdout = quick("attention_rows", tmp_path)
    assert {"dense mask", "per sample", "causal, no mask"} <= set(report["ms"])
    assert all(v > 0 for v in report["ms"].values())
    assert set(report["ms"]) | set(report["failed"]) == {"dense mask", "per sample",
                                                          "causal, no mask", "flex", "nested"}
    assert "| per sample |" in stdout


def test_batchnorm_digits(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    report, stdout = quick("batchnorm_digits", tmp_path)
    rows = report["rows"]
    assert [r["setting"] for r in rows] == ["full", "accum", "group", "freeze", "pooled"]
    assert [r["k"] for r in rows] == [1, 4, 4, 4, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 and len(r["accuracies"]) == 2 for r in rows)
    assert stdout.count("\n| (") == len(rows)  # one table row each
    assert "| (c) GroupNorm (converted), accumulation | 8 × 4 |" in stdout


def test_noise_overhead(tmp_path: Path) -> None:
    report, stdout = quick("noise_overhead", tmp_path)
    assert report["off_s"] > 0 and report["on_s"] > 0
    assert {"ratio", "paired_ratio", "k", "micro", "rounds", "settings"} <= set(report)
    assert "| on |" in stdout


@pytest.mark.distributed
def test_sync(tmp_path: Path) -> None:
    report, stdout = quick("sync", tmp_path)
    rows = report["rows"]
    assert [(row["kind"], row["k"]) for row in rows] == [("ddp", 2), ("fsdp2", 2)]
    ddp = rows[0]  # bytes are counted, not timed: sync every micro-batch sends K times as much
    assert ddp["micro_bytes"] == 2 * ddp["cycle_bytes"] > 0
    assert report["settings"]["ranks"] == 2
    assert "| ddp | 2 |" in stdout


def test_checkpoint_cost(tmp_path: Path) -> None:
    report, stdout = quick("checkpoint_cost", tmp_path)
    assert report["checkpoint_bytes"] > 0
    assert len(report["save_each_s"]) == len(report["load_each_s"]) == 2
    assert {"save_s", "load_verify_s", "micro_batch_s"} <= set(report)
    assert "checkpoint" in stdout
