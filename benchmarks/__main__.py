"""``python -m benchmarks NAME [--quick] [NAME's flags]``: run one benchmark.

``python -m benchmarks`` (or ``--list``) lists the benchmarks with one line each;
``python -m benchmarks NAME --help`` gives NAME's flags. An unknown NAME is one line on stderr and
exit status 2, as is a bad flag; a benchmark that cannot run here exits 1 with one line.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from . import BENCHMARKS, INTERNAL
from ._harness import BenchmarkError

USAGE = "usage: python -m benchmarks NAME [--quick] [--json PATH] [NAME's flags] | --list"


def describe(module: str) -> str:
    """The first line of a module's docstring, read without importing it (nor torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "(missing)"
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    return doc.strip().splitlines()[0].replace("``", "`") if doc.strip() else ""


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [USAGE, "", "benchmarks:"]
    lines += [f"  {name:<{width}}  {describe(module)}" for name, module in BENCHMARKS.items()]
    lines += ["", "Results: benchmarks/results/NAME.json (with --quick: the temporary folder, "
              "unless --json);", "time them alone: flock /tmp/bench.lock python -m benchmarks "
              "NAME. See benchmarks/README.md."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("--list", "-l", "-h", "--help"):
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    module = BENCHMARKS.get(name) or INTERNAL.get(name)
    if module is None:
        what = (f"{name}: give a benchmark NAME first" if name.startswith("-") else
                f"unknown benchmark {name!r}")
        print(f"python -m benchmarks: {what}; choose from {', '.join(BENCHMARKS)} (see --list)",
              file=sys.stderr)
        return 2
    try:
        return importlib.import_module(module).main(rest) or 0
    except BenchmarkError as err:
        print(f"python -m benchmarks {name}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
