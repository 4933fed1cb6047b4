"""The README's demo command, as a new user runs it: tiny models, local prompts, embedded Ray."""

import json

import pytest

from helpers import run_cli


def test_the_demo_spec_plans_its_prompts_into_40_samples(tmp_path):
    """The fast tier's look at the demo: its prompt table and spec, planned without running."""
    from sdfleet.jobs.demo import DEMO_PROMPTS, demo_spec, write_demo_prompts
    from sdfleet.jobs.plan import Planner
    from sdfleet.schemas.spec import parse_spec

    write_demo_prompts(tmp_path / "prompts")
    plan = Planner(parse_spec(demo_spec(tmp_path))).plan()
    assert len(DEMO_PROMPTS) == 10 and [f.rows for f in plan.files] == [5, 5]
    assert plan.num_samples == 40 and plan.num_shards == 4  # 10 prompts x 2 seeds x 2 scales


@pytest.mark.slow
def test_demo_makes_a_complete_dataset(tmp_path):
    out = run_cli("demo", str(tmp_path / "demo"), env={"RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    root = tmp_path / "demo" / "output"
    assert (root / "_SUCCESS").exists()
    assert sum(json.loads((root / "sizes.json").read_text()).values()) == 40
    # Its report goes to stdout (logs to stderr); it ends with a contact sheet to look at, and the
    # dataset card embeds a small one.
    assert f"Dataset: {root}" in out.stdout and "dataset complete: 40 images" in out.stdout
    assert f"look:    {root}/preview/contact_sheet.png" in out.stdout
    assert (root / "preview" / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "![A sample of the images](preview/card_contact_sheet.png)"
        in (root / "README.md").read_text()
    )
    assert (root / "preview" / "card_contact_sheet.png").exists()
    assert (tmp_path / "demo" / "models" / "tiny-sd2" / "model_index.json").exists()
    # Quiet: no start-up chatter of TensorFlow (its C++ lines, absl), Keras, botocore, transformers or Ray.
    noise = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if any(
            word in line
            for word in (
                "absl",
                "I0000",
                "E0000",
                "W0000",
                "cuInit",
                "oneDNN",
                "tensorflow",
                "keras",
                "botocore",
                "pkg_resources",
                "[transformers]",
                "Token authentication",
                "Writing model shards",
                "ms/step",
            )
        )
    ]
    assert noise == []
    # The written spec reruns as a plain `sdfleet run`, and finds nothing left to do.
    again = run_cli(
        "run", str(tmp_path / "demo" / "demo.yaml"), "--no-progress", env={"RAY_ADDRESS": ""}
    )
    assert again.returncode == 0 and "nothing to generate" in again.stderr
