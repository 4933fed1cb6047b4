"""FLUX.1 Fill (black-forest-labs/FLUX.1-Fill-dev): its own checkpoint, told apart by its
transformer's input channels, runs `inpaint` as FluxFillPipeline with its model card's defaults;
pre-flight refuses what that pipeline cannot do (another task, a negative prompt, true CFG) in one
line; the engine's images are plain FluxFillPipeline's, and a job's rows regenerate with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import job_dict, run_cli, write_prompts
from test_flux import image_task_sample
from test_tasks import assert_close, decoded, image_table, input_bytes, run_job, three_ok

FILL_MESSAGE = "is a flux (FLUX.1-Fill-dev) checkpoint"


def test_the_fill_checkpoint_is_flux_fill_by_its_transformer_config(tiny_flux):
    from sdfleet.schemas.families import family_of
    from sdfleet.schemas.family_flux import FLUX, FLUX1_DEV, FLUX1_FILL

    index = json.loads((tiny_flux["fill"] / "model_index.json").read_text())
    assert index["_class_name"] == "FluxFillPipeline" and family_of("FluxFillPipeline") is FLUX
    config = json.loads((tiny_flux["fill"] / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (16 + 16 + 256, 16)
    assert FLUX.variant(config) is FLUX1_FILL
    # The published configs: Fill-dev's 384 -> 64; dev's 64 (out_channels null); FLUX.1-Depth's
    # and -Canny's 128 -> 64 (the control image's latents only, no mask) are not Fill.
    assert FLUX.variant({"in_channels": 384, "out_channels": 64, "guidance_embeds": True}).name == (
        "FLUX.1-Fill-dev"
    )
    assert FLUX.variant({"in_channels": 64, "out_channels": None, "guidance_embeds": True}) is (
        FLUX1_DEV
    )
    assert FLUX.variant({"in_channels": 128, "out_channels": 64, "guidance_embeds": True}) is (
        FLUX1_DEV
    )
    # One owner of task -> class: Fill inpaints with its own class, dev keeps FluxInpaintPipeline.
    assert FLUX.pipeline("inpaint", FLUX1_FILL) == "FluxFillPipeline"
    assert FLUX.pipeline("inpaint", FLUX1_DEV) == "FluxInpaintPipeline"
    assert (
        FLUX.costed(config).flops.denoiser_tflop
        > FLUX.costed({"guidance_embeds": True}).flops.denoiser_tflop
    )


def _fill_job(tmp_path, source, task="inpaint", **sections):
    images = [b"png", b"png"]
    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"], image=images, mask=images)
    inputs = {"image_column": "image"}
    if task == "inpaint":
        inputs["mask_column"] = "mask"
    spec = job_dict(
        source,
        tmp_path / "in",
        tmp_path / "out",
        **{"model": {"task": task}, "input": inputs, **sections},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "job.yaml"


@pytest.mark.parametrize(
    ("task", "sections", "message"),
    [
        (
            "text-to-image",
            {},
            f"model.task=text-to-image: model.source {{source}} {FILL_MESSAGE}, whose "
            "FluxFillPipeline cannot do text-to-image; use model.task: inpaint",
        ),
        (
            "image-to-image",
            {},
            "model.task=image-to-image: model.source {source} " + FILL_MESSAGE,
        ),
        (
            "inpaint",
            {"generation": {"negative_prompt": "blurry"}},
            "generation.negative_prompt='blurry': a flux (FLUX.1-Fill-dev) checkpoint's pipeline "
            "(FluxFillPipeline) takes no negative prompt, and so no true CFG; remove "
            "generation.negative_prompt",
        ),
        (
            "inpaint",
            {"generation": {"true_cfg_scale": 4.0}},
            "generation.true_cfg_scale=4.0: a flux (FLUX.1-Fill-dev) checkpoint's pipeline",
        ),
    ],
)
def test_plan_refuses_what_fluxfillpipeline_cannot_do(tmp_path, tiny_flux, task, sections, message):
    if task == "text-to-image":
        write_prompts(tmp_path / "in" / "p.parquet", ["a cat"])
        spec = job_dict(tiny_flux["fill"], tmp_path / "in", tmp_path / "out")
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        job = tmp_path / "job.yaml"
    else:
        job = _fill_job(tmp_path, tiny_flux["fill"], task, **sections)
    out = run_cli("plan", str(job))
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1, out.stderr
    assert message.format(source=tiny_flux["fill"]) in errors[0], errors[0]


def test_plan_fills_in_fills_defaults_and_costs_it_as_fill(tmp_path, tiny_flux):
    """FluxFillPipeline's (and the model card's) 50 steps at guidance 30 and 512 T5 tokens."""
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.schemas.spec import load_spec

    checked = Preflight(load_spec(_fill_job(tmp_path, tiny_flux["fill"]))).check()
    gen = checked.plan.spec.generation
    assert (gen.num_inference_steps, gen.guidance_scale, gen.max_sequence_length) == (50, 30.0, 512)
    assert gen.true_cfg_scale == 1.0
    assert checked.variant.name == "FLUX.1-Fill-dev"
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    assert "flux (FluxFillPipeline, FLUX.1-Fill-dev by its transformer config)" in out.stdout


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_the_engine_makes_a_fill_image_as_plain_fluxfillpipeline(tiny_flux, strength):
    """The Engine as a worker builds it for inpaint on the Fill checkpoint: FluxFillPipeline
    (no auto pipeline maps to it), no negative prompt or true CFG passed, the input's size
    floored to the 16-px grid, the row's strength; the same pixels as plain diffusers."""
    import diffusers
    import torch

    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.spec import GenerationSpec, ModelSpec

    image, mask, params = image_task_sample(True, strength=strength, guidance_scale=30.0)
    model = ModelSpec(
        source=str(tiny_flux["fill"]), task="inpaint", scheduler=None, dtype="float32"
    )
    engine = Engine(
        model, device="cpu", batch_size=1, generation=GenerationSpec(max_sequence_length=24)
    )
    assert type(engine.pipe).__name__ == "FluxFillPipeline"
    assert engine.variant.name == "FLUX.1-Fill-dev" and "true_cfg_scale" not in engine.call_inputs
    assert engine.family_record["true_cfg_scale"] == 1.0
    [ours] = engine.call([params])
    assert ours.shape == (48, 64, 3)
    pipe = diffusers.FluxFillPipeline.from_pretrained(tiny_flux["fill"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "an oil painting",
        image=image,
        mask_image=mask,
        strength=strength,
        guidance_scale=30.0,
        num_inference_steps=3,
        max_sequence_length=24,
        width=64,
        height=48,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    assert_close(ours, (ref * 255).round().astype(np.uint8))


def test_a_dev_checkpoint_keeps_fluxinpaintpipeline(tiny_flux):
    from sdfleet.actors.components import checkpoint_class
    from sdfleet.schemas.family_flux import FLUX

    assert checkpoint_class(str(tiny_flux["dev"]), None, {}) == "FluxPipeline"
    assert FLUX.own_pipeline("FluxPipeline", "inpaint") is None  # the auto pipeline's pick
    assert FLUX.own_pipeline("FluxFillPipeline", "inpaint") == "FluxFillPipeline"


@pytest.mark.slow
def test_fill_rows_regenerate_with_plain_fluxfillpipeline(tmp_path, tiny_flux, s3, ray_cluster):
    """An inpaint job on the Fill checkpoint through `sdfleet run` (Ray, the local S3 server):
    its rows record what FluxFillPipeline was called with, and three of them regenerate from
    plain diffusers, the row's input image and mask."""
    import diffusers
    import torch

    table, _ = image_table(64, masks=True, uris=False)
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_flux["fill"],
        "inpaint",
        table,
        model={"scheduler": None},
        input={"image_column": "image", "mask_column": "mask"},
        generation={"num_inference_steps": 3, "max_sequence_length": 24},
        sweep={"seeds": 2, "axes": {"strength": [1.0, 0.8]}},
    )
    assert len(rows) == 16 and {r["status"] for r in rows.values()} == {"ok"}
    for row in rows.values():
        assert (row["width"], row["height"], row["max_sequence_length"]) == (64, 64, 24)
        assert (row["guidance_scale"], row["true_cfg_scale"]) == (30.0, 1.0)
        assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert {r["strength"] for r in rows.values()} == {1.0, 0.8}
    pipe = diffusers.FluxFillPipeline.from_pretrained(tiny_flux["fill"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for row in three_ok(rows):
        image = pipe(
            row["prompt"],
            image=decoded(input_bytes(s3, table, row, "input_image"), "RGB"),
            mask_image=decoded(input_bytes(s3, table, row, "mask_image"), "L"),
            strength=row["strength"],
            guidance_scale=row["guidance_scale"],
            num_inference_steps=row["num_inference_steps"],
            max_sequence_length=row["max_sequence_length"],
            width=row["width"],
            height=row["height"],
            generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
            output_type="np",
        ).images[0]
        assert_close(images[row["key"]], (image * 255).round().astype(np.uint8))


def test_the_example_spec_passes_fills_checks():
    """jobs/examples/flux1_fill_inpaint_1024.yaml, checked as pre-flight checks it against
    FLUX.1-Fill-dev's published transformer config."""
    from pathlib import Path

    from sdfleet.schemas.family_flux import FLUX
    from sdfleet.schemas.family_spec import check_family_spec, with_family_defaults
    from sdfleet.schemas.spec import load_spec

    example = Path(__file__).resolve().parents[1] / "jobs" / "examples"
    spec = load_spec(example / "flux1_fill_inpaint_1024.yaml")
    config = {"in_channels": 384, "out_channels": 64, "guidance_embeds": True}
    FLUX.check_task(spec.model.task, spec.model.source, FLUX.variant(config))
    check_family_spec(spec, FLUX, config, spec.model.source)
    gen = with_family_defaults(spec, FLUX, config).generation
    assert (gen.num_inference_steps, gen.guidance_scale, gen.max_sequence_length) == (50, 30.0, 512)
