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


@pytest.mark.slow  # 1-2 min on the shared 2 cores: seven full-size models on the meta device
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
    lines = [line.split() for line in out.stdout.splitlines() if line.strip()]
    rows = {words[0]: words[1:] for words in lines if words[0] != "model" and ":" not in words[0]}
    assert rows["sd2-base"][:2] == ["512", "0.8043"]
    assert rows["sdxl-base"][0] == "1024"
    assert set(rows) == {
        "sd2-base",
        "sdxl-base",
        "sdxl-refiner",
        "sd3.5-medium",
        "sd3.5-large",
        "flux1-dev",
        "flux1-schnell",
        "flux1-fill",
    }
    # The transformers' parameters, counted on the meta tensors (published: SD3.5 Large 8.1B,
    # FLUX.1 12B; SD3.5 Medium's model card says 2.5B, its transformer alone holds 2.24B).
    params = {name: float(rows[name][-1]) for name in rows if name.startswith(("sd3", "flux"))}
    assert params["sd3.5-medium"] == pytest.approx(2.243, abs=0.001)
    assert params["sd3.5-large"] == pytest.approx(8.057, abs=0.001)
    assert params["flux1-dev"] == pytest.approx(11.901, abs=0.001)
    assert params["flux1-schnell"] < params["flux1-dev"]  # no guidance embedder
    assert params["flux1-fill"] > params["flux1-dev"]  # x_embedder reads 384 channels, not 64
