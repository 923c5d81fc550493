"""The layers stay apart: the library never imports the command, ports never import PyTorch's side.

Each module under ``src/bigbatch`` is parsed (nothing imported) and every ``import`` it makes,
absolute or relative, at any depth (inside functions too), is resolved to a ``bigbatch.*`` name and
checked against its layer's rule:

* library (``bigbatch.*`` outside the subpackages below): no ``bigbatch.app``, no integration;
* ``bigbatch.integrations.*``: the library, never ``bigbatch.app``;
* ``bigbatch.jax`` / ``bigbatch.keras``: nothing of the PyTorch side (no ``torch``, no other
  ``bigbatch`` module but ``bigbatch.errors`` and their own);
* ``bigbatch.app``: anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PORTS = ("bigbatch.jax", "bigbatch.keras")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append(target)
            # ``from . import x`` may import a submodule x
            found += [f"{target}.{a.name}" for a in node.names]
    return found


def layer(name: str) -> str:
    if name.startswith("bigbatch.app"):
        return "app"
    if name.startswith("bigbatch.integrations"):
        return "integrations"
    if name.startswith(PORTS):
        return "port"
    return "library"


def problem(importer: str, imported: str) -> str | None:
    kind = layer(importer)
    if kind == "app":
        return None
    if kind == "port":
        own = next(p for p in PORTS if importer.startswith(p))
        allowed = (own, "bigbatch.errors")
        if imported.split(".")[0] == "torch" or (
                imported.startswith("bigbatch.") and not imported.startswith(allowed)):
            return f"{importer} (a framework port) imports {imported} of the PyTorch side"
        return None
    if not imported.startswith("bigbatch."):
        return None
    if layer(imported) == "app":
        return f"{importer} ({kind}) imports the command's {imported}"
    if kind == "library" and layer(imported) == "integrations":
        return f"{importer} (library) imports the integration {imported}"
    return None


def test_no_layer_imports_upwards() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        importer = module_name(path)
        if importer == "bigbatch.__main__":  # `python -m bigbatch`: the command's entry point
            continue
        problems += [p for imp in imports(path) if (p := problem(importer, imp))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("importer", "imported"), [
    ("bigbatch.packing", "bigbatch.app.data"),         # the break the layout fixed
    ("bigbatch.engine.core", "bigbatch.app.config"),
    ("bigbatch.integrations.lightning", "bigbatch.app.trainer"),
    ("bigbatch.jax.step", "bigbatch.loss"),
    ("bigbatch.keras.fit", "torch"),
])
def test_the_check_sees_a_broken_rule(importer: str, imported: str) -> None:
    assert problem(importer, imported) is not None


def test_relative_imports_resolve(tmp_path: Path) -> None:
    assert "bigbatch.app.config" in imports(SRC / "bigbatch" / "app" / "cli.py")
    assert "bigbatch.errors" in imports(SRC / "bigbatch" / "engine" / "core.py")


def loaded_after(statement: str, heavy: str) -> list[str]:
    """Modules among ``heavy`` (top-level names) that ``statement`` loads in a fresh process."""
    code = (f"import sys; {statement}; heavy = {heavy.split()!r}; print(sorted({{m.split('.')[0] "
            "for m in sys.modules if m.split('.')[0] in heavy or m.startswith('bigbatch.app')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout)


def test_the_library_needs_torch_only() -> None:
    """Using the library pulls in none of the command's dependencies nor an optional extra."""
    heavy = "yaml matplotlib safetensors transformers accelerate lightning jax tensorflow keras"
    assert loaded_after("import bigbatch; bigbatch.Accumulator; bigbatch.contrastive_step; "
                        "bigbatch.plan_micro_batch; import bigbatch.verify", heavy) == []


def test_import_bigbatch_is_lazy() -> None:
    """``import bigbatch`` (and its error types, which the ports use) loads no torch."""
    assert loaded_after("import bigbatch, bigbatch.errors", "torch") == []
    assert loaded_after("import bigbatch; bigbatch.LossSum", "torch") == ["torch"]


def test_the_engine_core_states_its_rule_and_stays_short() -> None:
    core = SRC / "bigbatch" / "engine" / "core.py"
    text = core.read_text()
    assert "g = (Σ_k ∇ sum_k) / (Σ_k count_k)" in ast.get_docstring(ast.parse(text))
    assert len(text.splitlines()) <= 360
