"""The ``bigbatch`` command for tests: in this process through ``main(argv)`` (fast), or as the
installed module in a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from bigbatch.app.cli import main


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run(*args: str, cwd: Path | None = None) -> Result:
    """``bigbatch ARGS`` in this process (argparse's own exits included), from ``cwd``."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # --help
                code = int(e.code or 0)
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def run_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bigbatch", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
