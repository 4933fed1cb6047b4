"""SDXL, step 2 of 6: the tiny base and refiner load with plain diffusers and generate on the CPU,
`sdfleet plan` estimates an SDXL checkpoint with the family table's figures, and an SDXL base job
through `sdfleet run` (Ray, the local S3 server) records what regeneration needs: its rows
regenerate with the plain StableDiffusionXLPipeline, as README.md's SDXL recipe does."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from test_tasks import assert_close, run_job, three_ok

# Longer than CLIP's 77 tokens for both tokenizers (the tiny ones split words into letters).
LONG = "a very long prompt about a lighthouse on a cliff over a stormy sea at dusk " * 3


def test_tiny_sdxl_is_shaped_as_sdxl(tiny_sdxl):
    from sdfleet.schemas.families import SDXL, family_of

    base = json.loads((tiny_sdxl["base"] / "model_index.json").read_text())
    refiner = json.loads((tiny_sdxl["refiner"] / "model_index.json").read_text())
    assert family_of(base["_class_name"]) is family_of(refiner["_class_name"]) is SDXL
    assert base["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert base["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert refiner["text_encoder"] == [None, None] and refiner["requires_aesthetics_score"]
    unet = json.loads((tiny_sdxl["base"] / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert (tiny_sdxl["base"] / "unet" / "diffusion_pytorch_model.safetensors").exists()
    vae = json.loads((tiny_sdxl["base"] / "vae" / "config.json").read_text())
    assert vae["force_upcast"] and vae["scaling_factor"] == 0.13025


def test_tiny_sdxl_generates_with_plain_diffusers(tiny_sdxl):
    """The base alone, then base -> refiner handing latents over at 0.5, as diffusers documents
    the ensemble of expert denoisers."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl["base"], use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_sdxl["refiner"], use_safetensors=True
    )
    assert base.tokenizer.model_max_length == base.tokenizer_2.model_max_length == 77
    prompt = "a cat on the mat"
    kwargs = {"num_inference_steps": 2, "width": 64, "height": 64}
    image = base(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    latents = base(
        prompt,
        generator=torch.Generator().manual_seed(0),
        denoising_end=0.5,
        output_type="latent",
        **kwargs,
    ).images
    refined = refiner(
        prompt,
        image=latents,
        num_inference_steps=2,
        denoising_start=0.5,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert refined.size == (64, 64)


def _plan(tmp_path, source, generation: dict):
    import yaml

    from helpers import run_cli, write_prompts

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    spec = {
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(source)},
        "safety": {"detector": "none"},
        "generation": generation,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_plan_prints_sdxl_flops_per_image_from_the_table(tmp_path, tiny_sdxl):
    """The checkpoint's model_index.json names StableDiffusionXLPipeline: the estimate is SDXL's
    row, at the spec's size, and at the checkpoint's native size (tiny: 8 x 8 = 64) without one."""
    from sdfleet.schemas.families import SDXL

    sized = _plan(
        tmp_path / "a", tiny_sdxl["base"], {"width": 1024, "height": 1024, "guidance_scale": 5.0}
    )
    assert "family        sdxl (StableDiffusionXLPipeline)" in sized
    figure = SDXL.tflop_per_image(1024, 1024, 50, 5.0)
    assert f"per image     {figure:.4g} TFLOP" in sized and f"{figure:.4g}" == "686.8"
    native = _plan(tmp_path / "b", tiny_sdxl["base"], {"num_inference_steps": 2})
    assert f"per image     {SDXL.tflop_per_image(64, 64, 2, 7.5):.4g} TFLOP" in native


def test_plan_of_an_sd2_checkpoint_names_sd2(tmp_path, tiny_model):
    from sdfleet.schemas.families import SD2

    out = _plan(tmp_path, tiny_model, {"width": 512, "height": 512})
    assert "family        sd2 (StableDiffusionPipeline)" in out
    assert f"per image     {SD2.tflop_per_image(512, 512, 50, 7.5):.4g} TFLOP" in out


def test_plan_refuses_a_task_sdxl_has_no_pipeline_for(tmp_path, tiny_sdxl):
    import yaml

    from helpers import run_cli, write_prompts

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"], image=[b"png", b"png"])
    spec = {
        "input": {"uri": str(tmp_path / "in"), "image_column": "image"},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(tiny_sdxl["base"]), "task": "depth-to-image"},
        "safety": {"detector": "none"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "model.task=depth-to-image: model.source" in out.stderr
        and "is an sdxl checkpoint, and sdxl has no pipeline for depth-to-image; it runs "
        "text-to-image, image-to-image, inpaint"
        in out.stderr
    )


# ------------------------------------------------------------------ rows regenerate (base)


def regenerate(pipe, row, **override) -> np.ndarray:
    """README.md's SDXL recipe: the row's image from plain diffusers and the row's values."""
    import diffusers
    import torch

    from sdfleet.schemas.rows import SIZE_CONDITIONING_COLUMNS

    pipe.scheduler = getattr(diffusers, row["scheduler"]).from_config(pipe.scheduler.config)
    conditioning = {name: tuple(row[name]) for name in SIZE_CONDITIONING_COLUMNS}
    image = pipe(
        row["prompt"],
        negative_prompt=row["negative_prompt"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        width=row["width"],
        height=row["height"],
        generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        output_type="np",
        **{**conditioning, **override},
    ).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.slow
def test_sdxl_rows_regenerate_with_plain_diffusers(tmp_path, tiny_sdxl, s3, ray_cluster):
    """A non-square size, so (height, width) order shows; a prompt over 77 tokens, so both
    encoders' truncation shows."""
    import diffusers

    table = pa.table(
        {"prompt_id": ["a", "b"], "prompt": ["a red fox in snow", LONG]},
    )
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_sdxl["base"],
        "text-to-image",
        table,
        generation={"width": 64, "height": 48, "guidance_scale": 5.0},
    )
    # 1. What the rows record: both encoders' counts, and the micro-conditioning as passed.
    for row in rows.values():
        assert (row["width"], row["height"]) == (64, 48)
        for name in ("original_size", "target_size", "negative_original_size"):
            assert row[name] == [48, 64], name
        assert row["crops_coords_top_left"] == row["negative_crops_coords_top_left"] == [0, 0]
        assert row["prompt_tokens_2"] == row["prompt_tokens"]
        long = row["prompt"] == LONG
        assert row["prompt_truncated"] is long and row["prompt_truncated_2"] is long
    # 2. Three rows from plain diffusers.
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl["base"], use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    for row in three_ok(rows):
        assert_close(images[row["key"]], regenerate(pipe, row))
    # 3. The recorded micro-conditioning matters: another original size is another image.
    row = three_ok(rows)[0]
    wrong = regenerate(pipe, row, original_size=(96, 128), negative_original_size=(96, 128))
    assert np.abs(images[row["key"]].astype(int) - wrong.astype(int)).max() > 2


def test_a_passthrough_column_named_as_an_sdxl_column_is_refused(tmp_path, tiny_sdxl):
    """Planning checks passthrough columns against the common columns; pre-flight, once it knows
    the checkpoint's family, against the family's own too."""
    import yaml

    from helpers import run_cli, write_prompts

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"], original_size=["x", "y"])
    spec = {
        "input": {"uri": str(tmp_path / "in"), "passthrough_columns": ["original_size"]},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(tiny_sdxl["base"])},
        "safety": {"detector": "none"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "input column 'original_size' clashes with sdfleet's output column original_size: rename "
        "it, input.passthrough_columns: {original_size: source_original_size}"
    ) in out.stderr
