"""FLUX.1, step 6 of 6: the tiny dev- and schnell-shaped checkpoints load with plain diffusers,
pre-flight refuses what a guidance-distilled bfloat16 family cannot run (naming the family and
the key) and fills in its checkpoint kind's defaults, and FLUX jobs through `sdfleet run` (Ray,
the local S3 server) record what regeneration needs: their rows regenerate with the plain
FluxPipeline, as README.md's FLUX.1 recipe does."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import yaml

from helpers import job_dict, run_cli, write_prompts
from test_tasks import assert_close, run_job, three_ok

# Longer than CLIP's 77 tokens and than the T5 tokens the jobs read (the tiny tokenizers split
# words finely).
LONG = "a very long prompt about a lighthouse on a cliff over a stormy sea at dusk " * 3
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"
TINY = {"width": 64, "height": 48, "num_inference_steps": 3, "max_sequence_length": 24}


def test_tiny_flux_is_shaped_as_flux(tiny_flux):
    from sdfleet.schemas.families import family_of
    from sdfleet.schemas.family_flux import FLUX

    for variant, embeds in (("dev", True), ("schnell", False)):
        index = json.loads((tiny_flux[variant] / "model_index.json").read_text())
        assert family_of(index["_class_name"]) is FLUX
        assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
        config = json.loads((tiny_flux[variant] / "transformer" / "config.json").read_text())
        assert config["guidance_embeds"] is embeds
        assert FLUX.variant(config).name == f"FLUX.1-{variant}"
        vae = json.loads((tiny_flux[variant] / "vae" / "config.json").read_text())
        assert vae["shift_factor"] and not vae["use_quant_conv"]
        assert (tiny_flux[variant] / "transformer" / "diffusion_pytorch_model.safetensors").exists()


# ------------------------------------------------------------------ pre-flight: refused, filled


def _plan(tmp_path, source, prompts=("a cat", "a dog"), **sections):
    write_prompts(tmp_path / "in" / "p.parquet", list(prompts))
    spec = job_dict(source, tmp_path / "in", tmp_path / "out", **sections)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return run_cli("plan", str(tmp_path / "job.yaml"))


REFUSED = [
    (
        "dev",
        {"generation": {"negative_prompt": "blurry"}},
        "generation.negative_prompt='blurry': a flux (FLUX.1-dev) checkpoint is guidance-distilled"
        " (no unconditional pass), so a negative prompt does nothing unless "
        "generation.true_cfg_scale > 1",
    ),
    (
        "dev",
        {"sweep": {"axes": {"negative_prompt": ["", "blurry"]}}},
        "sweep.axes.negative_prompt: a flux (FLUX.1-dev) checkpoint is guidance-distilled",
    ),
    (
        "schnell",
        {"generation": {"guidance_scale": 3.5}},
        "generation.guidance_scale=3.5: a flux (FLUX.1-schnell) checkpoint takes no guidance",
    ),
    (
        "schnell",
        {"sweep": {"axes": {"guidance_scale": [1.0, 3.5]}}},
        "sweep.axes.guidance_scale=[1.0, 3.5]: a flux (FLUX.1-schnell) checkpoint takes no "
        "guidance",
    ),
    (
        "dev",
        {"model": {"dtype": "float16"}},
        "model.dtype=float16: model.source is a flux (FLUX.1-dev) checkpoint: FLUX.1's "
        "activations overflow float16",
    ),
    (
        "dev",
        {"generation": {"width": 40, "height": 64}},
        "generation.width=40 is not divisible by 16, the latent grid of flux checkpoints; use "
        "e.g. 32 or 48",
    ),
    (
        "schnell",
        {"generation": {"max_sequence_length": 300}},
        "generation.max_sequence_length=300: a flux (FLUX.1-schnell) checkpoint's T5 encoder "
        "reads at most 256 tokens; use 256 or less",
    ),
    (
        "dev",
        {"generation": {"max_sequence_length": 513}},
        "generation.max_sequence_length=513: a flux (FLUX.1-dev) checkpoint's T5 encoder reads "
        "at most 512 tokens",
    ),
    (
        "dev",
        {"model": {"scheduler": "EulerDiscreteScheduler"}},
        "model.scheduler=EulerDiscreteScheduler: a flux (FLUX.1-dev) checkpoint is a "
        "flow-matching model and runs FlowMatch* schedulers only",
    ),
]


@pytest.mark.parametrize(("variant", "sections", "message"), REFUSED)
def test_plan_refuses_what_flux_cannot_run_naming_the_family_and_key(
    tmp_path, tiny_flux, variant, sections, message
):
    out = _plan(tmp_path, tiny_flux[variant], **sections)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"generation": {"max_sequence_length": 77}},
            "generation.max_sequence_length=77: an sd2 checkpoint has no T5 encoder to read it",
        ),
        (
            {"generation": {"true_cfg_scale": 4.0}},
            "generation.true_cfg_scale=4.0: an sd2 checkpoint has classifier-free guidance of its "
            "own",
        ),
    ],
)
def test_plan_refuses_flux_keys_on_an_sd2_checkpoint(tmp_path, tiny_model, sections, message):
    out = _plan(tmp_path, tiny_model, **sections)
    assert out.returncode == 1 and message in out.stderr, out.stdout + out.stderr


def _checked(tmp_path, source, **sections):
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.schemas.spec import load_spec

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    spec = job_dict(source, tmp_path / "in", tmp_path / "out", **sections)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return Preflight(load_spec(tmp_path / "job.yaml")).check().plan


def test_preflight_fills_in_each_checkpoint_kinds_defaults(tmp_path, tiny_flux):
    """What the spec leaves out, the checkpoint kind's model card gives: dev 28 steps at guidance
    3.5 and 512 T5 tokens, schnell 4 steps without guidance and 256; bfloat16 and the
    checkpoint's own flow-matching scheduler (its class written in) for both; FluxPipeline's
    1024 px."""
    dev = _checked(tmp_path / "dev", tiny_flux["dev"]).spec
    schnell = _checked(tmp_path / "schnell", tiny_flux["schnell"]).spec
    for spec, steps, guidance, tokens in ((dev, 28, 3.5, 512), (schnell, 4, 0.0, 256)):
        gen = spec.generation
        assert (gen.num_inference_steps, gen.guidance_scale) == (steps, guidance)
        assert (gen.max_sequence_length, gen.width, gen.height) == (tokens, 1024, 1024)
        assert (spec.model.dtype, spec.model.scheduler) == ("bfloat16", FLOW_MATCH)
    # What the spec says stands.
    given = {"num_inference_steps": 6, "guidance_scale": 5.0, "max_sequence_length": 64}
    spec = _checked(tmp_path / "given", tiny_flux["dev"], generation=given).spec
    assert {k: getattr(spec.generation, k) for k in given} == given


def test_an_sd2_spec_is_left_as_it_was(tmp_path, tiny_model):
    from sdfleet.schemas.spec import load_spec

    plan = _checked(tmp_path, tiny_model, generation={"width": 64, "height": 64})
    written = load_spec(tmp_path / "job.yaml")
    assert plan.spec == written


# ------------------------------------------------------------------ rows regenerate


def regenerate(pipe, row, **override) -> np.ndarray:
    """README.md's FLUX.1 recipe: the row's image from plain diffusers and the row's values."""
    import torch

    kwargs = dict(
        negative_prompt=row["negative_prompt"],
        true_cfg_scale=row["true_cfg_scale"],
        guidance_scale=row["guidance_scale"],
        num_inference_steps=row["num_inference_steps"],
        max_sequence_length=row["max_sequence_length"],
        width=row["width"],
        height=row["height"],
        generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        output_type="np",
    )
    image = pipe(row["prompt"], **{**kwargs, **override}).images[0]
    return (image * 255).round().astype(np.uint8)


def _flux_job(tmp_path, s3, address, source, table, **generation):
    # The checkpoint's own scheduler: run_job's Euler is a noise-prediction scheduler.
    tmp_path.mkdir()
    return run_job(
        tmp_path,
        s3,
        address,
        source,
        "text-to-image",
        table,
        model={"scheduler": None},
        generation={**TINY, **generation},
    )


def _pipe(source):
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(source, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_flux_rows_regenerate_with_plain_diffusers(tmp_path, tiny_flux, s3, ray_cluster):
    """Dev-shaped (guidance embedded, dynamic shift), schnell-shaped (neither), and dev with true
    CFG and negative prompts: three rows of each from plain FluxPipeline. A prompt over the T5
    tokens read and CLIP's 77, so both truncations show."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    table = pa.table({"prompt_id": ["a", "b"], "prompt": ["a red fox in snow", LONG]})
    with_negatives = pa.table(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["a red fox in snow", "a cup of coffee"],
            "negative_prompt": ["blurry, low quality", "text, watermark"],
        }
    )
    jobs = {
        "dev": _flux_job(tmp_path / "d", s3, ray_cluster.address, tiny_flux["dev"], table),
        "schnell": _flux_job(tmp_path / "s", s3, ray_cluster.address, tiny_flux["schnell"], table),
        "true-cfg": run_job(
            tmp_path,
            s3,
            ray_cluster.address,
            tiny_flux["dev"],
            "text-to-image",
            with_negatives,
            model={"scheduler": None},
            input={"negative_prompt_column": "negative_prompt"},
            generation={**TINY, "true_cfg_scale": 3.0},
        ),
    }
    pipes = {v: _pipe(tiny_flux[v]) for v in ("dev", "schnell")}
    for name, (rows, images, _) in jobs.items():
        pipe = pipes["schnell" if name == "schnell" else "dev"]
        for row in rows.values():
            # 1. What the rows record: the call's values and both encoders' counts.
            assert (row["width"], row["height"], row["max_sequence_length"]) == (64, 48, 24)
            assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler"
            assert row["guidance_scale"] == (0.0 if name == "schnell" else 3.5)
            assert row["true_cfg_scale"] == (3.0 if name == "true-cfg" else 1.0)
            long = row["prompt"] == LONG
            assert row["prompt_truncated"] is long and row["prompt_truncated_2"] is long
            assert (row["prompt_tokens_2"] > 24) is long
            # Dev's schedule shifts by the image's tokens (64/16 x 48/16 = 12); schnell's not.
            shift = None if name == "schnell" else calculate_shift(12, 256, 4096, 0.5, 1.15)
            assert row["scheduler_mu"] == shift
        # 2. Three rows from plain diffusers.
        for row in three_ok(rows):
            assert_close(images[row["key"]], regenerate(pipe, row))
    # 3. The recorded values matter: without true CFG, or another embedding, another image.
    rows, images, _ = jobs["true-cfg"]
    row = three_ok(rows)[0]
    plain = regenerate(pipes["dev"], row, negative_prompt=None)
    assert np.abs(images[row["key"]].astype(int) - plain.astype(int)).max() > 2
    rows, images, _ = jobs["dev"]
    row = three_ok(rows)[0]
    other = regenerate(pipes["dev"], row, guidance_scale=8.0)
    assert np.abs(images[row["key"]].astype(int) - other.astype(int)).max() > 2


@pytest.mark.slow
def test_a_sweep_of_t5_length_and_true_cfg_regenerates_row_by_row(
    tmp_path, tiny_flux, s3, ray_cluster
):
    """sweep.axes.max_sequence_length x sweep.axes.true_cfg_scale on a dev-shaped checkpoint: each
    row records the values its sample ran with (T5's truncation at its own length), regenerates
    from them with plain FluxPipeline, and the axis values change the image and the sample id."""
    table = pa.table({"prompt_id": ["a", "b"], "prompt": ["a red fox in snow", LONG]})
    lengths, scales = [8, 24], [1.0, 3.0]
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_flux["dev"],
        "text-to-image",
        table,
        model={"scheduler": None},
        generation=TINY,
        sweep={"seeds": 1, "axes": {"max_sequence_length": lengths, "true_cfg_scale": scales}},
    )
    # 1. One row per prompt and point, each with its point's values and its own id.
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())
    points = {
        (r["prompt_id"], r["max_sequence_length"], r["true_cfg_scale"]) for r in rows.values()
    }
    assert points == {(p, n, c) for p in "ab" for n in lengths for c in scales}
    assert len({r["sample_id"] for r in rows.values()}) == 8
    for row in rows.values():
        assert row["prompt_truncated_2"] is (row["prompt_tokens_2"] > row["max_sequence_length"])
    # 2. Every row from plain diffusers and its own values.
    pipe = _pipe(tiny_flux["dev"])
    for row in rows.values():
        assert_close(images[row["key"]], regenerate(pipe, row))
    # 3. Each axis changes the image (the same prompt and seed, one value apart). A prompt's four
    #    points share a shard, so one worker made them: any difference is the value's. The tiny
    #    transformer reads its text weakly, so the differences are small, but never none.
    by_point = {
        (r["prompt_id"], r["max_sequence_length"], r["true_cfg_scale"]): images[r["key"]]
        for r in rows.values()
    }
    for prompt in "ab":
        base = by_point[prompt, 24, 1.0]
        assert not np.array_equal(base, by_point[prompt, 8, 1.0])
        assert not np.array_equal(base, by_point[prompt, 24, 3.0])


def test_the_example_specs_pass_their_checkpoint_kinds_checks():
    """jobs/examples' FLUX.1 specs, checked as pre-flight checks them against the published
    transformer configs (guidance_embeds true for dev, false for schnell)."""
    from pathlib import Path

    from sdfleet.schemas.family_flux import FLUX
    from sdfleet.schemas.family_spec import check_family_spec, with_family_defaults
    from sdfleet.schemas.spec import load_spec

    examples = Path(__file__).resolve().parents[1] / "jobs" / "examples"
    for name, embeds, tokens, steps in (("dev", True, 512, 28), ("schnell", False, 256, 4)):
        spec = load_spec(examples / f"flux1_{name}_1024.yaml")
        config = {"guidance_embeds": embeds}
        check_family_spec(spec, FLUX, config, spec.model.source)
        # No scheduler config read: the engine runs the loaded checkpoint's own.
        resolved = with_family_defaults(spec, FLUX, config)
        assert (resolved.model.dtype, resolved.model.scheduler) == ("bfloat16", None)
        gen = resolved.generation
        assert (gen.max_sequence_length, gen.num_inference_steps) == (tokens, steps)
        assert gen.guidance_scale == (3.5 if embeds else 0.0)


# ------------------------------------------------------------------ image tasks


def image_task_sample(masked: bool, strength: float, guidance_scale: float):
    """A 75 x 50 input (the engine floors it to 64 x 48), a random mask where `masked`, and the
    sample that reads them: (image, mask or None, GenerationParams)."""
    from PIL import Image

    from sdfleet.schemas.samples import GenerationParams, InputImage

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 75, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(rng.random((50, 75)) > 0.5, 255, 0).astype(np.uint8))
    params = GenerationParams(
        prompt="an oil painting",
        negative_prompt="",
        seed=7,
        num_inference_steps=3,
        guidance_scale=guidance_scale,
        width=None,
        height=None,
        scheduler=None,
        strength=strength,
        image=InputImage(image, "0" * 64),
        mask=InputImage(mask, "1" * 64) if masked else None,
    )
    return image, mask if masked else None, params


@pytest.mark.parametrize("task", ["image-to-image", "inpaint"])
def test_flux_image_tasks_match_plain_diffusers(tiny_flux, task):
    """The Engine, as a worker builds it: the base checkpoint as FluxImg2ImgPipeline or
    FluxInpaintPipeline, told the input's size floored to the 16-px grid (the pipelines would
    make 1024² otherwise), and its schedule shifted by that size's tokens."""
    import diffusers
    import torch
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.spec import GenerationSpec, ModelSpec

    image, mask, params = image_task_sample(task == "inpaint", strength=0.6, guidance_scale=3.5)
    model = ModelSpec(source=str(tiny_flux["dev"]), task=task, scheduler=None, dtype="float32")
    generation = GenerationSpec(max_sequence_length=24)
    engine = Engine(model, device="cpu", batch_size=1, generation=generation)
    classes = {"image-to-image": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}
    assert type(engine.pipe).__name__ == classes[task]
    assert "fuse_qkv" in engine.applied  # on the transformer: the pipeline has no such method
    [ours] = engine.call([params])
    assert ours.shape == (48, 64, 3)
    assert engine.scheduler_mu(params) == calculate_shift(12, 256, 4096, 0.5, 1.15)
    pipe = getattr(diffusers, classes[task]).from_pretrained(tiny_flux["dev"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    extra = {"mask_image": mask} if task == "inpaint" else {}
    ref = pipe(
        "an oil painting",
        image=image,
        strength=0.6,
        guidance_scale=3.5,
        num_inference_steps=3,
        max_sequence_length=24,
        width=64,
        height=48,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
        **extra,
    ).images[0]
    assert_close(ours, (ref * 255).round().astype(np.uint8))


def test_plan_accepts_flux_image_to_image(tmp_path, tiny_flux):
    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"], image=[b"png", b"png"])
    spec = job_dict(
        tiny_flux["dev"],
        tmp_path / "in",
        tmp_path / "out",
        model={"task": "image-to-image"},
        input={"image_column": "image"},
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    assert "family        flux (FluxPipeline, FLUX.1-dev by its transformer config)" in out.stdout


def test_flux_keys_are_in_a_samples_identity_only_where_set():
    """A FLUX sample's id changes with its T5 tokens and true CFG (its rows' family columns, as
    the engine records them); an SD2 sample (no such columns) keeps the id and the spec
    fingerprint it had before the keys existed."""
    from sdfleet.schemas.families import SD2
    from sdfleet.schemas.family_flux import FLUX
    from sdfleet.schemas.family_spec import call_inputs, record
    from sdfleet.schemas.fingerprint import fingerprint_fields
    from sdfleet.schemas.samples import GenerationParams, sample_id
    from sdfleet.schemas.spec import GenerationSpec, JobSpec

    def columns(family, **gen):
        inputs = call_inputs(family, {"guidance_embeds": True}, GenerationSpec(**gen))
        return record(family, inputs, drop_t5=False, scheduler_shift=None)

    sd2 = GenerationParams("a cat", "", 1, 28, 3.5, 1024, 1024, None)
    assert columns(SD2) == {}
    ids = {
        sample_id("m", None, sd2, "FlowMatchEulerDiscreteScheduler", family=family)
        for family in (
            columns(SD2),
            columns(FLUX),  # dev's default 512 tokens, no true CFG
            columns(FLUX, max_sequence_length=256),
            columns(FLUX, max_sequence_length=512, true_cfg_scale=3.0),
        )
    }
    assert len(ids) == 4
    # The payload a text-to-image id hashed before the T5 families (schemas/samples.py).
    before = {
        "model_source": "m",
        "model_revision": None,
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 1,
        "scheduler": "X",
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "width": 1024,
        "height": 1024,
    }
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:32]
    assert sample_id("m", None, sd2, "X", family=columns(SD2)) == digest
    spec = JobSpec.model_validate({"input": {"uri": "in"}, "output": {"uri": "out"}})
    fields = fingerprint_fields(spec.model_dump(mode="json"))
    assert "generation.max_sequence_length" not in fields
    assert "generation.true_cfg_scale" not in fields
    flux = spec.model_copy(
        update={"generation": spec.generation.model_copy(update={"max_sequence_length": 512})}
    )
    assert fingerprint_fields(flux.model_dump(mode="json"))["generation.max_sequence_length"] == 512


def test_flux_rows_name_the_static_shift_or_mu_whichever_the_scheduler_runs(tiny_flux):
    """FLUX rows carry both flow-matching columns, as the engine fills them: dev's scheduler
    shifts by the image (scheduler_mu; its static shift 3.0 unused, so null), schnell's by its
    static shift 1.0 (scheduler_mu null); and the job's T5 length and true CFG."""
    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.family_flux import FLUX
    from sdfleet.schemas.rows import family_fields
    from sdfleet.schemas.samples import GenerationParams
    from sdfleet.schemas.spec import GenerationSpec, ModelSpec

    names = [f.name for f in family_fields(FLUX)]
    assert {"max_sequence_length", "true_cfg_scale", "scheduler_shift", "scheduler_mu"} <= set(
        names
    )
    assert "drop_t5" not in names and "skip_guidance_layers" not in names
    params = GenerationParams("a cat", "", 1, 3, 0.0, 64, 48, None)
    generation = GenerationSpec(max_sequence_length=24, true_cfg_scale=2.0)
    for variant, shift, shifts_by_image in (("dev", None, True), ("schnell", 1.0, False)):
        model = ModelSpec(source=str(tiny_flux[variant]), scheduler=None, dtype="float32")
        engine = Engine(model, device="cpu", batch_size=1, generation=generation)
        assert engine.family_record == {
            "max_sequence_length": 24,
            "true_cfg_scale": 2.0,
            "scheduler_shift": shift,
        }
        assert (engine.scheduler_mu(params) is not None) is shifts_by_image
