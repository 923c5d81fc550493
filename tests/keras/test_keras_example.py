"""The Keras example runs (one epoch) and shows bigbatch on the full batch, Keras's own far off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "keras_stdlib.py"


@pytest.mark.slow
def test_keras_example(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--out",
                          str(tmp_path / "plot.png")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    found = re.search(r"bigbatch ([0-9.e+-]+), Keras's own ([0-9.e+-]+)", out.stdout)
    assert found, out.stdout
    assert float(found[1]) < 1e-10 and float(found[2]) > 1e-3
    assert (tmp_path / "plot.png").stat().st_size > 10_000
