"""SDXL base + refiner (`model.refiner`, the "ensemble of expert denoisers"): the spec key, what
the driver refuses before any worker starts, `sdfleet plan`'s FLOPs for both models, and a job
through `sdfleet run` (Ray, the local S3 server) whose rows regenerate with plain
StableDiffusionXLPipeline + StableDiffusionXLImg2ImgPipeline, as README.md's recipe does."""

# ruff: noqa: F811 -- the tests take the imported tiny_sdxl fixture by name

from __future__ import annotations

import pytest
import yaml

from helpers import job_dict, run_cli, write_prompts
from test_sdxl import tiny_sdxl  # noqa: F401 -- its module fixture, shared (F811 below)


def _spec(tmp_path, source, refiner: dict | None = None, **sections) -> dict:
    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    model = {"source": str(source), **({"refiner": refiner} if refiner else {})}
    return job_dict(source, tmp_path / "in", tmp_path / "out", model=model, **sections)


def _plan(tmp_path, spec: dict):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return run_cli("plan", str(tmp_path / "job.yaml"))


# ------------------------------------------------------------------------------------ the spec


def test_refiner_keys_and_defaults():
    from sdfleet.schemas.spec import parse_spec

    spec = parse_spec(
        {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"refiner": {"source": "r"}}}
    )
    refiner = spec.model.refiner
    assert (refiner.denoising_start, refiner.revision) == (0.8, None)
    assert refiner.steps(30) == 30 and refiner.guidance(5.0) == 5.0
    for bad in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match="denoising_start"):
            parse_spec(
                {
                    "input": {"uri": "in"},
                    "output": {"uri": "out"},
                    "model": {"refiner": {"source": "r", "denoising_start": bad}},
                }
            )


def test_a_refiner_on_an_image_task_is_a_spec_error(tmp_path, tiny_sdxl):
    spec = _spec(tmp_path, tiny_sdxl["base"], {"source": str(tiny_sdxl["refiner"])})
    spec["model"]["task"] = "image-to-image"
    spec["input"]["image_column"] = "image"
    out = _plan(tmp_path, spec)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "model.refiner is for model.task=text-to-image; model.task=image-to-image" in out.stderr


def test_every_refiner_key_is_in_the_fingerprint():
    """A job made without a refiner keeps its fingerprint (the key is left out at its default);
    each refiner key changes it."""
    from sdfleet.schemas.spec import parse_spec

    base = {"input": {"uri": "in"}, "output": {"uri": "out"}}
    without = parse_spec(base)
    assert "model.refiner" not in without.fingerprint_fields()
    refined = {"source": "r", "denoising_start": 0.8}
    prints = {
        without.fingerprint(),
        parse_spec({**base, "model": {"refiner": refined}}).fingerprint(),
    }
    for key, value in {
        "source": "other",
        "revision": "v2",
        "denoising_start": 0.7,
        "num_inference_steps": 10,
        "guidance_scale": 3.0,
    }.items():
        spec = parse_spec({**base, "model": {"refiner": {**refined, key: value}}})
        assert spec.fingerprint_fields()["model.refiner"][key] == value
        prints.add(spec.fingerprint())
    assert len(prints) == 7


# ------------------------------------------------------------------- checks before any worker


def test_plan_counts_base_and_refiner_flops(tmp_path, tiny_sdxl):
    """The printed figure is the family table's counts (those bench/flops.py checks) for the
    base's steps up to the handover, the refiner's after it, both text encoders, one decode."""
    from sdfleet.schemas.families import SDXL

    refiner = {"source": str(tiny_sdxl["refiner"]), "num_inference_steps": 30, "guidance_scale": 1}
    spec = _spec(
        tmp_path,
        tiny_sdxl["base"],
        refiner,
        generation={"width": 1024, "height": 1024, "num_inference_steps": 50, "guidance_scale": 5},
    )
    out = _plan(tmp_path, spec)
    assert out.returncode == 0, out.stderr
    base, ref = SDXL.flops, SDXL.refiner_flops
    # 40 of the base's 50 steps with CFG (2 passes); 30 - 24 = 6 refiner steps without (1).
    figure = (
        base.denoiser_tflop * 2 * 40
        + ref.denoiser_tflop * 1 * 6
        + base.text_tflop
        + ref.text_tflop
        + ref.vae_decode_tflop
    )
    assert f"per image     {figure:.4g} TFLOP (base to denoising_end" in out.stdout
    assert f"{figure:.4g}" != f"{SDXL.tflop_per_image(1024, 1024, 50, 5):.4g}"


@pytest.mark.parametrize(
    "base, refiner, says",
    [
        ("sd2", "refiner", "model.source {base} is an sd2 checkpoint, and sd2 has no refiner"),
        ("base", "sd2", "(StableDiffusionPipeline) is an sd2 checkpoint, but model.source"),
        ("base", "base", "(StableDiffusionXLPipeline) is not an sdxl refiner"),
    ],
)
def test_plan_refuses_a_refiner_that_does_not_fit(
    tmp_path, tiny_sdxl, tiny_model, base, refiner, says
):
    models = {**tiny_sdxl, "sd2": tiny_model}
    spec = _spec(tmp_path, models[base], {"source": str(models[refiner])})
    out = _plan(tmp_path, spec)
    assert out.returncode == 1, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert f"model.refiner.source {models[refiner]}" in line, line
    assert says.format(base=models[base]) in line, line


def test_plan_refuses_a_refiner_with_pickle_weights(tmp_path, tiny_sdxl):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sdxl["refiner"], pickled)
    for f in (pickled / "unet").glob("*.safetensors"):
        f.rename(f.with_name("diffusion_pytorch_model.bin"))
    out = _plan(tmp_path, _spec(tmp_path, tiny_sdxl["base"], {"source": str(pickled)}))
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"model.refiner.source {pickled} holds only pickle weights for unet" in out.stderr
