"""Write JSONL data for each ``bigbatch train --task`` from the Python standard library's source.

    python examples/make_task_data.py /tmp/stdlib-data
    # → instruct.jsonl   {"prompt": "...docstring...\\n", "completion": "def name(...):..."}
    #   chat.jsonl       {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    #   classify.jsonl   {"text": "...docstring...", "label": "email"}
    #   search.jsonl     {"query": "...docstring...", "document": "def name(...): ..."}

Every function of the standard library that has a docstring gives one record: the docstring's
first paragraph (what it does) and the function's source without the docstring (how). For
``classify`` the label is the package it belongs to, among a few large ones (``asyncio``,
``email``, ``xml``, ``tkinter``, ``idlelib``, ``multiprocessing``), so the task is to tell
from a description which part of the library it documents. Deterministic for a given Python.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("asyncio", "email", "xml", "tkinter", "idlelib", "multiprocessing")


def functions(limit_chars: int = 1200) -> list[tuple[str, str, str]]:
    """``(package, description, code)`` of every documented top-level or method function."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "site-packages", "idle_test") for p in rel):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or not node.body or node.end_lineno is None:
                continue
            description = " ".join(doc.split("\n\n")[0].split())
            body = node.body[1:]  # without the docstring
            if not body or len(description) < 20:
                continue
            head = lines[node.lineno - 1].strip()
            code = "\n".join([head] + lines[body[0].lineno - 1:node.end_lineno])[:limit_chars]
            out.append((rel[0] if len(rel) > 1 else "", description, code))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the four files into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    found = functions()
    files = {name: (args.out / f"{name}.jsonl").open("w") for name in
             ("instruct", "chat", "classify", "search")}
    counts = dict.fromkeys(files, 0)
    for package, description, code in found:
        records = {
            "instruct": {"prompt": f"Write a Python function. {description}\n",
                         "completion": code},
            "chat": {"messages": [{"role": "user", "content": description},
                                  {"role": "assistant", "content": code}]},
            "search": {"query": description, "document": code},
        }
        if package in PACKAGES:
            records["classify"] = {"text": description, "label": package}
        for name, record in records.items():
            files[name].write(json.dumps(record) + "\n")
            counts[name] += 1
    for f in files.values():
        f.close()
    for name, n in counts.items():
        print(f"wrote {args.out / (name + '.jsonl')}: {n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
