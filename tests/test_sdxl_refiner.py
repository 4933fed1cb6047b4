"""SDXL base + refiner (`model.refiner`, the "ensemble of expert denoisers"): the spec key, what
the driver refuses before any worker starts, `sdfleet plan`'s FLOPs for both models, and a job
through `sdfleet run` (Ray, the local S3 server) whose rows regenerate with plain
StableDiffusionXLPipeline + StableDiffusionXLImg2ImgPipeline, as README.md's recipe does."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import yaml

from helpers import job_dict, run_cli, write_prompts
from test_sdxl import regenerate as regenerate_base
from test_tasks import assert_close, run_job, three_ok


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


def test_a_relative_refiner_folder_is_relative_to_the_spec_file(tmp_path):
    from sdfleet.schemas.spec import load_spec

    (tmp_path / "models" / "refiner").mkdir(parents=True)
    spec = {
        "input": {"uri": "in"},
        "output": {"uri": "out"},
        "model": {"refiner": {"source": "./models/refiner"}},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec(tmp_path / "job.yaml")
    assert loaded.model.refiner.source == str((tmp_path / "models" / "refiner").resolve())


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


def test_a_refined_sample_has_its_own_sample_id():
    """sample_id names everything that determines the pixels: the refiner's values too, and a
    sample without a refiner keeps the id it had before refiners."""
    from sdfleet.schemas.samples import GenerationParams, sample_id

    params = GenerationParams("a fox", "", 1, 30, 5.0, 1024, 1024, None)
    plain = sample_id("base", None, params, "EulerDiscreteScheduler")
    assert sample_id("base", None, params, "EulerDiscreteScheduler", None) == plain
    ids = {
        sample_id("base", None, params, "EulerDiscreteScheduler", {"denoising_end": end})
        for end in (0.7, 0.8)
    }
    assert len(ids | {plain}) == 3


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
    assert (
        f"refiner       {tiny_sdxl['refiner']} (StableDiffusionXLImg2ImgPipeline) from "
        "denoising_start 0.8" in out.stdout
    )
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


# ------------------------------------------------------------------- rows regenerate (refined)


def regenerate(base, refiner, row) -> np.ndarray:
    """README.md's base + refiner recipe: the row's image from plain diffusers and the row's
    values alone, the base's latents handed to the refiner as diffusers documents it."""
    import diffusers
    import torch

    from sdfleet.schemas.rows import SIZE_CONDITIONING_COLUMNS

    for pipe in (base, refiner):
        pipe.scheduler = getattr(diffusers, row["scheduler"]).from_config(pipe.scheduler.config)
    conditioning = {name: tuple(row[name]) for name in SIZE_CONDITIONING_COLUMNS}
    latents = base(
        row["prompt"],
        negative_prompt=row["negative_prompt"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        width=row["width"],
        height=row["height"],
        generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        denoising_end=row["denoising_end"],
        output_type="latent",
        **conditioning,
    ).images
    image = refiner(
        row["prompt"],
        negative_prompt=row["negative_prompt"],
        image=latents,
        denoising_start=row["refiner_denoising_start"],
        num_inference_steps=row["refiner_num_inference_steps"],
        guidance_scale=row["refiner_guidance_scale"],
        aesthetic_score=row["refiner_aesthetic_score"],
        negative_aesthetic_score=row["refiner_negative_aesthetic_score"],
        generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        output_type="np",
        **conditioning,
    ).images[0]
    return (image * 255).round().astype(np.uint8)


def test_only_a_refiner_job_has_the_refiner_columns():
    from sdfleet.schemas.families import SDXL
    from sdfleet.schemas.rows import REFINER_FIELDS, output_schema

    plain, refined = output_schema(family=SDXL), output_schema(family=SDXL, refiner=True)
    assert refined.names == plain.names + [f.name for f in REFINER_FIELDS]
    assert not any(f.name.startswith("refiner_") or f.name == "denoising_end" for f in plain)


def test_a_memory_probe_runs_both_denoisers(tiny_sdxl):
    """batch_size auto measures calls of base + refiner, long enough that each runs a denoiser
    forward (one step would leave the refiner, or the base, none at a handover of 0.8)."""
    from sdfleet.actors.batching import memory_probe
    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.samples import GenerationParams
    from sdfleet.schemas.spec import ModelSpec

    model = ModelSpec(source=str(tiny_sdxl["base"]), refiner={"source": str(tiny_sdxl["refiner"])})
    engine = Engine(model, batch_size=1)
    assert engine.sizer.probe_steps == engine.refiner.probe_steps > 1
    forwards = {"base": 0, "refiner": 0}
    for name, pipe in (("base", engine.pipe), ("refiner", engine.refiner.pipe)):
        pipe.unet.register_forward_hook(lambda *_, n=name: forwards.update({n: forwards[n] + 1}))
    sample = GenerationParams("a fox", "", 1, 30, 1.0, 64, 64, None)
    (image,) = engine.call([memory_probe(sample, engine.sizer.probe_steps)])
    assert image.shape == (64, 64, 3)
    assert forwards["base"] >= 1 and forwards["refiner"] >= 1, forwards


@pytest.mark.slow
def test_base_refiner_rows_regenerate_with_plain_diffusers(tmp_path, tiny_sdxl, s3, ray_cluster):
    """The refiner's own steps and guidance, a handover at 0.7, a non-square size: three rows
    regenerate from their values with StableDiffusionXLPipeline + StableDiffusionXLImg2ImgPipeline,
    and the refiner's part shows (the base alone makes another image)."""
    import diffusers

    table = pa.table({"prompt_id": ["a", "b"], "prompt": ["a red fox in snow", "a lighthouse"]})
    refiner = {
        "source": str(tiny_sdxl["refiner"]),
        "denoising_start": 0.7,
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
    }
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_sdxl["base"],
        "text-to-image",
        table,
        model={"refiner": refiner},
        generation={"width": 64, "height": 48, "guidance_scale": 5.0},
    )
    # 1. What the rows record: the refiner's source and what its pipeline ran with.
    for row in rows.values():
        assert row["refiner_source"] == refiner["source"] and row["refiner_revision"] is None
        assert row["denoising_end"] == row["refiner_denoising_start"] == 0.7
        assert (row["refiner_num_inference_steps"], row["refiner_guidance_scale"]) == (4, 3.0)
        # StableDiffusionXLImg2ImgPipeline's defaults, the tiny refiner requiring them.
        assert (row["refiner_aesthetic_score"], row["refiner_negative_aesthetic_score"]) == (6, 2.5)
        assert (row["num_inference_steps"], row["guidance_scale"]) == (3, 5.0)
    # 2. Three rows from plain diffusers.
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl["base"], use_safetensors=True
    )
    refined = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_sdxl["refiner"], use_safetensors=True
    )
    for pipe in (base, refined):
        pipe.set_progress_bar_config(disable=True)
    for row in three_ok(rows):
        assert_close(images[row["key"]], regenerate(base, refined, row))
    # 3. The refiner made a difference: the base alone is another image.
    row = three_ok(rows)[0]
    alone = regenerate_base(base, row)
    assert np.abs(images[row["key"]].astype(int) - alone.astype(int)).max() > 2


def test_every_example_spec_parses():
    """jobs/examples' specs are valid as written (the base + refiner one with its values)."""
    from pathlib import Path

    from sdfleet.schemas.spec import load_spec

    examples = Path(__file__).resolve().parents[1] / "jobs" / "examples"
    specs = {path.name: load_spec(path) for path in sorted(examples.glob("*.yaml"))}
    refined = specs["sdxl_base_refiner_1024.yaml"]
    assert refined.model.source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert refined.model.refiner.source == "stabilityai/stable-diffusion-xl-refiner-1.0"
    assert refined.model.refiner.denoising_start == 0.8
    assert (refined.generation.width, refined.generation.height) == (1024, 1024)
