"""An installed sdfleet is the package `sdfleet` and nothing else: no top-level `jobs`, `actors` or
`schemas` in site-packages to shadow, or be shadowed by, PyPI's projects of those names.

The wheel is built from this checkout with the test venv's own setuptools and installed without
dependencies into a fresh venv, offline; that venv borrows the test venv's third-party packages
through a path entry (not a site dir, so the test venv's editable sdfleet is not seen).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            **(env or {}),
        },
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with sdfleet installed from a wheel of this checkout (`pip install .`, not editable)."""
    tmp = tmp_path_factory.mktemp("install")
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp / "dist",
        REPO,
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("sdfleet-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", wheel, cwd=tmp)
    site = Path(
        run(
            venv / "bin" / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ).stdout.strip()
    )
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_installed_distribution_claims_only_the_name_sdfleet(installed):
    site = Path(
        run(
            installed / "bin" / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ).stdout.strip()
    )
    (dist_info,) = site.glob("sdfleet-*.dist-info")
    records = [
        line.split(",", 1)[0] for line in (dist_info / "RECORD").read_text().splitlines() if line
    ]
    top_level = {r.split("/", 1)[0] for r in records if not r.startswith(("../", dist_info.name))}
    assert top_level == {"sdfleet"}
    assert {
        "sdfleet/jobs/cli.py",
        "sdfleet/actors/engine.py",
        "sdfleet/schemas/spec.py",
        "sdfleet/jobs/gpu_throughput.yaml",
        "sdfleet/jobs/examples/sd2_model_card_eval.yaml",
        "sdfleet/jobs/preview/gallery.html.j2",
    } <= set(records)


def test_installed_package_imports_and_its_command_runs(installed, tmp_path):
    python = installed / "bin" / "python"
    code = (
        "import sdfleet.jobs.cli, importlib.util as u; print(sdfleet.jobs.cli.__file__); "
        "print([m for m in ('jobs', 'actors', 'schemas') if u.find_spec(m)])"
    )
    where, shadows = run(python, "-c", code, cwd=tmp_path).stdout.splitlines()
    assert where.startswith(str(installed)) and shadows == "[]"
    assert "run" in run(installed / "bin" / "sdfleet", "--help", cwd=tmp_path).stdout


def test_ray_ships_the_package_under_its_own_name(tmp_path):
    """What the driver hands Ray's py_modules is a folder named `sdfleet` that imports on its own."""
    import shutil

    from sdfleet.jobs.pool import staged_package

    stage = staged_package()
    try:
        assert stage.name == "sdfleet" and not (stage / "__init__.py").exists()
        code = f"import sys; sys.path.insert(0, {str(stage.parent)!r}); import sdfleet.jobs.cli as c; print(c.__file__)"
        assert run(sys.executable, "-c", code, cwd=tmp_path).stdout.strip() == str(
            stage / "jobs" / "cli.py"
        )
    finally:
        shutil.rmtree(stage.parent)


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists the packages one by one (the folders map to sdfleet.*): a new subpackage
    left out would be missing from every non-editable install, as jobs/dedup once was."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        "sdfleet." + ".".join(p.parent.relative_to(REPO).parts)
        for root in ("schemas", "actors", "jobs")
        for p in (REPO / root).rglob("__init__.py")
    }
    assert set(config["packages"]) == folders
    assert all(
        config["package-dir"][name] == name.removeprefix("sdfleet.").replace(".", "/")
        for name in folders
    )
