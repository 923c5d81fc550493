"""MirroredStrategy over two logical CPU devices equals one device (float64, 1e-10).

Runs ``tests/support/keras_mirrored.py`` in its own process: logical devices must be configured
before TensorFlow's runtime starts, which it has in this pytest process. Each replica runs its
half of every batch in micro-batches; the item counts, loss sums and gradients are summed over
the replicas before the one division, and clipping sees the global gradient.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "support" / "keras_mirrored.py"


@pytest.mark.slow
def test_mirrored_strategy_equals_one_device() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mirrored"] < 1e-10  # fit: padded, masked tokens, schedule, global_clipnorm
    assert result["mirrored_sgd"] < 1e-10
    assert result["tape"] < 1e-10  # the Accumulator inside strategy.run
    assert result["pooled_bn"] < 1e-10  # pooled BatchNorm statistics span the replicas
    # Keras's own full-batch fit averages the replicas' own token means and clips per replica.
    assert result["keras_mirrored"] > 1e-3
