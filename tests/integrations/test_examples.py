"""The before/after examples in ``examples/integrations`` run and show what they claim: the
documented script off the full batch, the changed one on it (float64; DeepSpeed's in float32)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "integrations"
NEEDS = {"transformers": "transformers", "accelerate": "accelerate", "lightning": "lightning",
         "deepspeed": "deepspeed"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEEDS))
def test_example_before_is_off_and_after_is_exact(name: str) -> None:
    if importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed")
    r = subprocess.run([sys.executable, str(EXAMPLES / f"{name}_before_after.py")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before = float(re.search(r"before \(as documented\):\s+(\S+)", r.stdout).group(1))
    after = float(re.search(r"after \(the bigbatch change\):\s+(\S+)", r.stdout).group(1))
    assert before > 1e-2, r.stdout
    assert after <= (1e-5 if name == "deepspeed" else 1e-10), r.stdout
