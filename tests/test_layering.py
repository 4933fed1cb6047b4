"""Imports run one way, `schemas` <- `actors` <- `jobs` (then bench/ and tests/), always under the
`sdfleet` name, and no module reaches into another module's private names.

Checked on the source's syntax trees (every import, also those inside functions), so a lazy import
that breaks the layering is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = {"schemas": 0, "actors": 1, "jobs": 2}
# Imported by the CPU-side code on laptops and by the CLI before it knows what it will run.
HEAVY = ("torch", "ray", "tensorflow", "diffusers", "transformers", "keras", "tf_keras")


def product_modules() -> list[tuple[str, Path]]:
    """(dotted module name, path) of every module that installs under `sdfleet`."""
    found = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found.append((".".join(("sdfleet", *parts)).removesuffix(".__init__"), path))
    return found


def imports(tree: ast.AST, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every import in the tree."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = (
                    module.split(".")[: -node.level]
                    if not module.endswith("__init__")
                    else module.split(".")
                )
                base = ".".join(package + ([base] if base else []))
            out.append((node.lineno, base, [alias.name for alias in node.names]))
    return out


def layering_errors(module: str, path: Path, root: Path = REPO) -> list[str]:
    layer = LAYERS[module.split(".")[1]]
    errors = []
    for line, target, names in imports(ast.parse(path.read_text()), module):
        where = f"{path.relative_to(root)}:{line}"
        top = target.split(".")[0]
        if top in LAYERS:
            errors.append(f"{where} imports {target!r}: import it as 'sdfleet.{target}'")
        if top != "sdfleet" or target == "sdfleet":
            for name in names:  # `from sdfleet import jobs` names a layer too
                if target == "sdfleet" and name in LAYERS and LAYERS[name] > layer:
                    errors.append(f"{where}: {module} imports sdfleet.{name}, a layer above it")
            if layer == 0 and top in HEAVY:
                errors.append(
                    f"{where}: schemas import {target!r}; schemas stay free of heavy frameworks"
                )
            continue
        target_layer = target.split(".")[1] if "." in target else None
        if target_layer in LAYERS and LAYERS[target_layer] > layer:
            errors.append(
                f"{where}: {module} imports {target}, a layer above it "
                f"({' <- '.join(LAYERS)} is the only direction)"
            )
    return errors


def private_import_errors(path: Path, module: str | None, root: Path = REPO) -> list[str]:
    """`from other.module import _private`, or `other_module._private` through an imported module."""
    tree = ast.parse(path.read_text())
    errors, module_aliases = [], {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] == "sdfleet"
        ):
            for alias in node.names:
                if alias.name.startswith("_") and node.module != module:
                    errors.append(
                        f"{path.relative_to(root)}:{node.lineno} imports {alias.name} from {node.module}"
                    )
                else:
                    module_aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sdfleet" and alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
        ):
            errors.append(
                f"{path.relative_to(root)}:{node.lineno} reaches into "
                f"{module_aliases[node.value.id]}.{node.attr}"
            )
    return errors


def test_imports_run_one_way_under_the_sdfleet_name():
    errors = [e for module, path in product_modules() for e in layering_errors(module, path)]
    assert errors == []


@pytest.mark.parametrize("folder", ["schemas", "actors", "jobs", "bench", "tests"])
def test_no_module_imports_another_modules_private_names(folder):
    modules = dict((p, m) for m, p in product_modules())
    errors = [
        e
        for p in sorted((REPO / folder).rglob("*.py"))
        for e in private_import_errors(p, modules.get(p))
    ]
    assert errors == []


def test_the_layering_check_catches_a_wrong_way_import(tmp_path):
    """The checks above have teeth: an actors module importing jobs, a top-level `jobs` import and a
    private name taken across modules are each reported."""
    bad = tmp_path / "actors" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "from sdfleet.jobs.plan import Planner\nimport jobs.cli\n"
        "def f():\n    from sdfleet.jobs import output\n"
        "from sdfleet.actors.storage import _first_line\n"
    )
    errors = layering_errors("sdfleet.actors.bad", bad, root=tmp_path)
    private = private_import_errors(bad, "sdfleet.actors.bad", root=tmp_path)
    assert any("imports sdfleet.jobs.plan, a layer above it" in e for e in errors)
    assert any("imports 'jobs.cli': import it as 'sdfleet.jobs.cli'" in e for e in errors)
    assert any(
        e.startswith("actors/bad.py:4") and "imports sdfleet.jobs, a layer above" in e
        for e in errors
    )
    assert private == ["actors/bad.py:5 imports _first_line from sdfleet.actors.storage"]


def test_the_engine_imports_without_ray_pydantic_or_tensorflow():
    """bench/gpu.py runs the engine on a GPU machine that has torch, transformers and diffusers only."""
    import subprocess
    import sys

    code = (
        "import sys, sdfleet.actors.engine; print(sorted(m for m in ('ray', 'pydantic', 'tensorflow', 'yaml') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stderr
