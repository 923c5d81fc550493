"""``import bigbatch.integrations.<trainer>`` costs nothing until it is used: the Accelerate,
Lightning and DeepSpeed modules import their trainer only when a call needs it (the HF module
defines a ``Trainer`` subclass, so it imports transformers), and ``import bigbatch`` imports
none of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

TRAINERS = ("transformers", "accelerate", "lightning", "pytorch_lightning", "deepspeed")


@pytest.mark.slow
def test_integration_modules_import_no_trainer() -> None:
    code = ("import sys, bigbatch, bigbatch.integrations, bigbatch.integrations.accelerate, "
            "bigbatch.integrations.lightning, bigbatch.integrations.deepspeed; "
            f"print([m for m in {TRAINERS!r} if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
