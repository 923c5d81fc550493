"""Shared fixtures: ``float64`` (default dtype float64 and torch seed 0 for one test) and ``text``
(a small real text file for the command-line tests)."""

from __future__ import annotations

import os
import re
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


# A test skipped for a missing package is fine on a machine without that extra, but on CI, which
# installs every extra the tests need (".[dev]"), it would hide a broken install as a pass: there
# such skips fail the session, listed. Skips for other reasons (no CUDA, a package that cannot be
# installed next to the others) stay skips.
MISSING_PACKAGE = re.compile(r"could not import|is not installed|No module named")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") != "true":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    missing = sorted({str(r.longrepr[-1]) if isinstance(r.longrepr, tuple) else str(r.longrepr)
                      for r in skipped if MISSING_PACKAGE.search(str(r.longrepr))})
    if missing:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nCI: {len(missing)} skip(s) for a package [dev] should have installed: "
              + "; ".join(missing), file=sys.stderr)
