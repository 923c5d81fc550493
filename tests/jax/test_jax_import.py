"""``import bigbatch.jax`` loads JAX and optax, and nothing of PyTorch's side."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")


def test_import_bigbatch_jax_loads_no_torch() -> None:
    code = ("import sys, bigbatch.jax; print(sorted(m for m in sys.modules if m.split('.')[0] == "
            "'torch' or (m.startswith('bigbatch.') and not m.startswith(('bigbatch.jax', "
            "'bigbatch.errors'))))); print('jax' in sys.modules and 'optax' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "True"]
