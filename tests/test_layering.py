"""Imports run one way, `schemas` <- `actors` <- `jobs` (then bench/ and tests/), always under the
`sdfleet` name, and no module reaches into another module's private names.

The layering is import-linter's (the contracts in pyproject.toml, run by `make lint`); the tests
here prove those contracts have teeth, on a copy of the tree with a wrong import added. The
private-name rule is a name, not a module, so import-linter cannot say it: it is checked here on
the source's syntax trees.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("schemas", "actors", "jobs")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def product_modules() -> list[tuple[str, Path]]:
    """(dotted module name, path) of every module that installs under `sdfleet`."""
    found = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found.append((".".join(("sdfleet", *parts)).removesuffix(".__init__"), path))
    return found


def lint_imports_on_a_copy(tmp_path: Path, bad: dict[str, str]) -> subprocess.CompletedProcess:
    """lint-imports with pyproject.toml's contracts, on a copy of the three packages laid out as
    `sdfleet/<layer>/` and found first on PYTHONPATH, plus the `bad` modules (path -> source)."""
    for layer in LAYERS:
        shutil.copytree(
            REPO / layer, tmp_path / "sdfleet" / layer, ignore=shutil.ignore_patterns("__pycache__")
        )
    for relative, source in bad.items():
        (tmp_path / "sdfleet" / relative).write_text(source)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_hold_on_an_unchanged_copy(tmp_path):
    """The copy is checked as the tree is (else the broken runs below would prove nothing)."""
    done = lint_imports_on_a_copy(tmp_path, {})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    "path, source, contract, message",
    [
        (
            "actors/bad.py",
            "def f():\n    from sdfleet.jobs import output\n",
            "Imports run one way: schemas <- actors <- jobs",
            "sdfleet.actors.bad -> sdfleet.jobs.output (l.2)",
        ),
        (
            "schemas/bad.py",
            "from sdfleet.actors.storage import Storage\n",
            "Imports run one way: schemas <- actors <- jobs",
            "sdfleet.schemas.bad -> sdfleet.actors.storage (l.1)",
        ),
        (
            "schemas/bad.py",
            "import torch\n",
            "schemas import no heavy framework",
            "sdfleet.schemas.bad -> torch (l.1)",
        ),
        (
            "actors/bad.py",
            "import jobs.cli\n",
            "sdfleet code imports its own modules under the sdfleet name",
            "sdfleet.actors.bad -> jobs (l.1)",
        ),
    ],
    ids=["lazy-wrong-way", "wrong-way", "heavy-in-schemas", "bare-name"],
)
def test_each_import_contract_fails_when_broken(tmp_path, path, source, contract, message):
    done = lint_imports_on_a_copy(tmp_path, {path: source})
    assert done.returncode != 0
    assert f"{contract} BROKEN" in done.stdout
    assert message in done.stdout


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


@pytest.mark.parametrize("folder", ["schemas", "actors", "jobs", "bench", "tests"])
def test_no_module_imports_another_modules_private_names(folder):
    modules = dict((p, m) for m, p in product_modules())
    errors = [
        e
        for p in sorted((REPO / folder).rglob("*.py"))
        for e in private_import_errors(p, modules.get(p))
    ]
    assert errors == []


def test_the_private_name_check_catches_a_private_import(tmp_path):
    """The check above has teeth: a private name taken across modules is reported, whether imported
    by name or reached through an imported module."""
    bad = tmp_path / "actors" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "from sdfleet.jobs.plan import Planner\nimport jobs.cli\n"
        "def f():\n    from sdfleet.jobs import output\n"
        "from sdfleet.actors.storage import _first_line\n"
    )
    private = private_import_errors(bad, "sdfleet.actors.bad", root=tmp_path)
    assert private == ["actors/bad.py:5 imports _first_line from sdfleet.actors.storage"]
    bad.write_text("import sdfleet.actors.storage as storage\nstorage._first_line()\n")
    private = private_import_errors(bad, "sdfleet.actors.bad", root=tmp_path)
    assert private == ["actors/bad.py:2 reaches into sdfleet.actors.storage._first_line"]


def test_the_engine_imports_without_ray_pydantic_or_tensorflow():
    """bench/gpu.py runs the engine on a GPU machine that has torch, transformers and diffusers only."""
    code = (
        "import sys, sdfleet.actors.engine; print(sorted(m for m in ('ray', 'pydantic', 'tensorflow', 'yaml') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stderr


# When a feature lands its concept gets a home of its own instead of growing the hottest file;
# these limits make that rule one a change can fail.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def oversized(path: Path) -> list[str]:
    """What in one module is over the limits: the module, and each function or method."""
    source = path.read_text()
    found = []
    if len(source.splitlines()) > MAX_MODULE_LINES:
        found.append(f"{path.name}: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{path.name}: {node.name} {lines} lines")
    return found


def test_no_module_or_function_is_oversized():
    found = [item for _, path in product_modules() for item in oversized(path)]
    assert not found, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function"


def test_the_size_check_catches_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}")
    assert oversized(tmp_path / "long.py") == [f"long.py: long {MAX_FUNCTION_LINES + 1} lines"]
