"""The package's structure: no import cycle, every module importable on its own, no module
reaching into another object's underscored members, registries that match their configs."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

#: The package under test, found without executing it (so a broken import fails a test, not the
#: collection).
PACKAGE = Path(importlib.util.find_spec("cl_sulora").origin).resolve().parent
#: Third-party modules whose underscored functions are their public API (``torch._foreach_*``).
PUBLIC_UNDERSCORES = {"torch"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``name`` imports when it is executed (imports under
    ``if TYPE_CHECKING`` excluded), with the packages Python initialises on the way, except
    those it sits in itself."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    targets = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        base = package.split(".")
        base = base[: len(base) - node.level + 1] if node.level else []
        module = ".".join([*base, *([node.module] if node.module else [])])
        targets.add(module)
        targets |= {f"{module}.{alias.name}" for alias in node.names}
    found = set()
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own:
                found.add(prefix)
    return found


def test_the_module_graph_has_no_cycle():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(name for name in modules() if not name.endswith("__main__"))
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'cl_sulora']:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_module_reaches_into_another_objects_underscored_members():
    offenders = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls", *PUBLIC_UNDERSCORES}:
                continue
            if isinstance(owner, ast.Call) and ast.unparse(owner.func) == "super":
                continue
            offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders


def test_config_choices_are_the_registered_allocators_and_fusion_policies():
    from cl_sulora.adapters.config import SubspaceLoRAConfig
    from cl_sulora.methods.sulora import ALLOCATORS, FUSION_POLICIES

    hints = get_type_hints(SubspaceLoRAConfig)
    assert set(get_args(hints["allocator"])) == set(ALLOCATORS)
    assert set(get_args(hints["fusion"])) == set(FUSION_POLICIES)


def test_the_package_under_test_is_the_installed_one_where_ci_asks():
    if not os.environ.get("CL_SULORA_EXPECT_INSTALLED"):
        pytest.skip("CI sets CL_SULORA_EXPECT_INSTALLED to the checkout when it tests a wheel")
    checkout = Path(os.environ["CL_SULORA_EXPECT_INSTALLED"]).resolve()
    assert checkout not in PACKAGE.parents, f"testing the source tree {PACKAGE}, not the wheel"
    assert Path(sys.prefix).resolve() in PACKAGE.parents  # the virtual environment's copy
    assert (PACKAGE / "presets" / "sulora.yaml").is_file()  # package data shipped


#: The areas in dependency order (docs/architecture.md): each imports only areas before it.
AREAS = ["_third_party", "errors", "linalg", "ridge", "seeding", "atomic", "metrics", "adapters",
         "models", "training", "methods", "saving", "benchmarks", "runner", "__main__"]


def test_each_area_imports_only_the_areas_before_it():
    found = modules()
    late = []
    for name, path in found.items():
        if name == "cl_sulora":
            continue
        area = name.split(".")[1]
        for target in imports(name, path, set(found)):
            other = target.split(".")[1] if "." in target else "cl_sulora"
            if other != area and (other == "cl_sulora"
                                  or AREAS.index(other) > AREAS.index(area)):
                late.append(f"{name} -> {target}")
    assert not late, late
