"""bench/flops.py counts the full-size models' FLOPs on meta tensors; the family table states them.
The SD2 row's figures (known before the script) coming out again checks the method."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

from flops import matches


def test_a_count_matches_a_rounded_figure_and_nothing_further():
    assert matches(0.8043, 0.8045)  # CFG's 1.609 halved
    assert matches(2.5145, 2.51) and matches(0.0903, 0.09)
    assert not matches(6.7612, 6.9) and not matches(0.8043, 0.81)


@pytest.mark.slow  # 12-35 s on the shared 2 cores: three full-size models on the meta device
def test_the_family_table_states_what_the_full_size_models_count():
    out = subprocess.run(
        [sys.executable, "bench/flops.py", "--check"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:]}
    assert rows["sd2-base"][:2] == ["512", "0.8043"]
    assert rows["sdxl-base"][0] == "1024" and set(rows) == {"sd2-base", "sdxl-base", "sdxl-refiner"}
