"""Shared fixtures: ``float64`` (default dtype float64 and torch seed 0 for one test) and ``text``
(a small real text file for the command-line tests)."""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Test support modules (the independent references, the distributed worker) import by name.
sys.path.insert(0, str(Path(__file__).parent / "support"))


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real text: two standard-library modules' source (json's decoder and textwrap)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((stdlib / "json" / "decoder.py").read_bytes()
                     + (stdlib / "textwrap.py").read_bytes())
    return path
