"""SD3.5, step 5 of 6: the family row (three text encoders, T5's sequence length, a 16-px latent
grid, Medium and Large told apart by the transformer's depth), the tiny SD3 pipeline, the spec keys
the family adds (generation.max_sequence_length, model.drop_t5, skip-layer guidance) and their
errors, and an SD3 job through `sdfleet run` whose rows regenerate with plain
StableDiffusion3Pipeline, with T5 and without."""

from __future__ import annotations

import pytest

from sdfleet.schemas.families import FAMILIES, family_of
from sdfleet.schemas.family_sd3 import SD3, SD35_LARGE, SD35_MEDIUM


def test_sd3_row_is_found_by_its_pipeline_classes():
    assert FAMILIES["sd3"] is SD3
    for cls in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"):
        assert family_of(cls) is SD3
    assert family_of("StableDiffusion3InpaintPipeline") is SD3
    import diffusers

    for cls in SD3.pipelines.values():  # each class is one the installed diffusers has
        assert isinstance(getattr(diffusers, cls), type), cls


def test_sd3_encoders_grid_and_dtype():
    clip_l, clip_g, t5 = SD3.text_encoders
    assert (clip_l.component, clip_l.tokenizer, clip_l.max_tokens) == (
        "text_encoder",
        "tokenizer",
        77,
    )
    assert clip_l.pooled and clip_g.pooled and clip_g.component == "text_encoder_2"
    assert t5.sequence and t5.droppable and not t5.pooled and t5.max_tokens == 512
    assert SD3.sequence_encoder is t5 and SD3.droppable_encoder is t5
    assert SD3.latent_grid == 16 and SD3.denoiser == "transformer" and SD3.dtype == "bfloat16"
    # The native size: the transformer's sample_size (128) x the VAE's scale (8).
    assert SD3.native_size(128, 8) == 1024
    with pytest.raises(
        ValueError, match=r"latent grid of sd3 checkpoints; use e\.g\. 1008 or 1024"
    ):
        SD3.check_size("generation.width", 1016)


def test_medium_and_large_by_the_transformer_depth():
    assert SD3.variant({"num_layers": 24, "sample_size": 128}) is SD35_MEDIUM
    assert SD3.variant({"num_layers": 38}) is SD35_LARGE
    assert SD3.variant({"num_layers": 2}) is None  # the tiny one: the family's defaults
    assert SD35_MEDIUM.skip_guidance_layers == (7, 8, 9) and not SD35_LARGE.skip_guidance_layers
    assert SD3.sequence_limits(SD35_MEDIUM) == SD3.sequence_limits(None) == (256, 512)
    assert SD35_LARGE.flops.denoiser_tflop > SD35_MEDIUM.flops.denoiser_tflop
    # Families without T5 have no sequence to limit.
    assert FAMILIES["sdxl"].sequence_limits(None) is None


# ------------------------------------------------------------------ the tiny SD3 pipeline


def test_tiny_sd3_is_shaped_as_sd3(tiny_sd3):
    import json

    index = json.loads((tiny_sd3 / "model_index.json").read_text())
    assert family_of(index["_class_name"]) is SD3
    assert (
        index["text_encoder"]
        == index["text_encoder_2"]
        == [
            "transformers",
            "CLIPTextModelWithProjection",
        ]
    )
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_3"][1].startswith("T5Tokenizer")  # transformers 5: one T5 class
    transformer = json.loads((tiny_sd3 / "transformer" / "config.json").read_text())
    assert transformer["patch_size"] == 2 and SD3.variant(transformer) is None
    assert (tiny_sd3 / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    vae = json.loads((tiny_sd3 / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and vae["shift_factor"] == 0.0609
    scheduler = json.loads((tiny_sd3 / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["shift"] == 3.0


def test_tiny_sd3_generates_with_plain_diffusers(tiny_sd3):
    """T5's sequence length and dropping T5 each change the image; image-to-image loads the same
    folder."""
    import numpy as np
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == 77

    def make(p, **kwargs):
        generator = torch.Generator().manual_seed(0)
        kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
        return p("a cat on the mat", generator=generator, **kwargs).images[0]

    image = make(pipe, max_sequence_length=16)
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert np.abs(image - make(pipe, max_sequence_length=32)).max() > 0.01
    dropped = StableDiffusion3Pipeline.from_pretrained(
        tiny_sd3, text_encoder_3=None, tokenizer_3=None, use_safetensors=True
    )
    dropped.set_progress_bar_config(disable=True)
    assert np.abs(image - make(dropped, max_sequence_length=16)).max() > 0.01
    img2img = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_sd3, use_safetensors=True)
    img2img.set_progress_bar_config(disable=True)
    made = make(img2img, image=torch.from_numpy(image).permute(2, 0, 1)[None], strength=0.8)
    assert made.shape == (64, 64, 3)


# ------------------------------------------------------------------ spec keys and their errors


def _spec(tmp_path, source, model=None, **generation) -> str:
    import yaml

    from helpers import write_prompts

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    spec = {
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(source), **(model or {})},
        "safety": {"detector": "none"},
        "generation": generation,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "job.yaml")


def _refused(command: str, spec: str) -> str:
    from helpers import run_cli

    out = run_cli(command, spec)
    assert out.returncode == 1, out.stdout + out.stderr
    return out.stderr


def _large(tmp_path, tiny_sd3):
    """The tiny SD3 with its transformer's config saying 38 layers, as SD3.5 Large's does: the
    driver reads configs only, so it is refused as Large would be."""
    import json
    import shutil

    large = shutil.copytree(tiny_sd3, tmp_path / "tiny-sd3-large")
    config = large / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 38}))
    return large


def test_plan_resolves_the_family_defaults_into_the_spec(tmp_path, tiny_sd3):
    """No scheduler, size or sequence length in the spec: the checkpoint's FlowMatch scheduler,
    its native 64 px and T5's 256 tokens are what plan shows and the fingerprint holds."""
    import yaml

    from helpers import run_cli

    out = run_cli("plan", _spec(tmp_path, tiny_sd3))
    assert out.returncode == 0, out.stderr
    assert "family        sd3 (StableDiffusion3Pipeline)" in out.stdout
    from sdfleet.jobs.preflight import Preflight
    from sdfleet.schemas.spec import load_spec

    spec = Preflight(load_spec(tmp_path / "job.yaml")).check().plan.spec
    assert spec.model.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert spec.generation.max_sequence_length == 256 and spec.generation.width == 64
    assert spec.generation.skip_guidance_layers is None
    fields = spec.fingerprint_fields()
    assert fields["generation.max_sequence_length"] == 256
    assert "model.drop_t5" not in fields  # at its default, as jobs made before it had it
    # Skip-layer guidance with its layers alone gets the pipeline's scale, start and stop.
    yaml_spec = yaml.safe_load((tmp_path / "job.yaml").read_text())
    yaml_spec["generation"] = {"skip_guidance_layers": [1], "guidance_scale": 4.0}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(yaml_spec))
    gen = Preflight(load_spec(tmp_path / "job.yaml")).check().plan.spec.generation
    assert gen.skip_guidance_layers == [1] and gen.skip_layer_guidance_scale == 2.8
    assert (gen.skip_layer_guidance_start, gen.skip_layer_guidance_stop) == (0.01, 0.2)


@pytest.mark.parametrize(
    ("model", "generation", "message"),
    [
        (
            {},
            {"max_sequence_length": 600},
            "generation.max_sequence_length=600: an sd3 checkpoint's T5 encoder reads at most "
            "512 tokens; use 512 or less (default 256)",
        ),
        (
            {},
            {"width": 72, "height": 64},
            "generation.width=72 is not divisible by 16, the latent grid of sd3 checkpoints; use "
            "e.g. 64 or 80",
        ),
        (
            {"scheduler": "EulerDiscreteScheduler"},
            {},
            "model.scheduler=EulerDiscreteScheduler: an sd3 checkpoint is a flow-matching model "
            "and runs FlowMatch* schedulers only",
        ),
        (
            {},
            {"skip_guidance_layers": [2]},
            "generation.skip_guidance_layers=[2]: model.source {source}'s transformer has 2 "
            "layers (0 to 1); layer 2 is not one of them",
        ),
        (
            {},
            {"skip_guidance_layers": [1], "guidance_scale": 1.0},
            "skip-layer guidance runs only with classifier-free guidance",
        ),
    ],
)
def test_sd3_spec_errors_name_the_family_and_key(tmp_path, tiny_sd3, model, generation, message):
    err = _refused("plan", _spec(tmp_path, tiny_sd3, model, **generation))
    assert message.format(source=tiny_sd3) in err, err


def test_skip_layer_guidance_on_large_is_refused_before_any_worker(tmp_path, tiny_sd3):
    spec = _spec(tmp_path, _large(tmp_path, tiny_sd3), skip_guidance_layers=[7, 8, 9])
    err = _refused("run", spec)
    assert "is an sd3 (sd3.5-large) checkpoint, which has no skip-layer guidance" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_keys_of_sd3_on_other_families_are_refused(tmp_path, tiny_model, tiny_sdxl):
    err = _refused("plan", _spec(tmp_path / "a", tiny_sdxl["base"], {"drop_t5": True}))
    assert "model.drop_t5: model.source" in err and "is an sdxl checkpoint, which has no T5" in err
    err = _refused("plan", _spec(tmp_path / "b", tiny_model, max_sequence_length=128))
    assert "generation.max_sequence_length=128: an sd2 checkpoint has no T5 encoder" in err, err
    err = _refused("run", _spec(tmp_path / "c", tiny_sdxl["base"], skip_guidance_layers=[1]))
    assert "is an sdxl checkpoint, which has no skip-layer guidance" in err, err


def test_skip_layer_guidance_keys_are_checked_as_the_spec_is_read(tmp_path, tiny_sd3):
    err = _refused("plan", _spec(tmp_path / "a", tiny_sd3, skip_layer_guidance_scale=3.0))
    assert "generation.skip_layer_guidance_scale is for skip-layer guidance" in err, err
    err = _refused("plan", _spec(tmp_path / "b", tiny_sd3, skip_guidance_layers=[]))
    assert "generation.skip_guidance_layers=[]: give distinct transformer layer indices" in err


# ------------------------------------------------------------------ rows regenerate (Ray, S3)

# Longer than CLIP's 77 tokens and than the job's T5 sequence (the tiny tokenizers split words).
LONG = "a very long prompt about a lighthouse on a cliff over a stormy sea at dusk " * 3
T5_TOKENS = 24


def regenerate(folder, row, **override):
    """README.md's SD3.5 recipe: the row's image from plain StableDiffusion3Pipeline and the row's
    values (T5 left out where the row says drop_t5; skip-layer guidance where it has layers)."""
    import diffusers
    import numpy as np
    import torch

    from sdfleet.schemas.family_spec import SKIP_LAYER_GUIDANCE_KEYS

    dropped = {"text_encoder_3": None, "tokenizer_3": None} if row["drop_t5"] else {}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
        folder, use_safetensors=True, **dropped
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, row["scheduler"]).from_config(
        pipe.scheduler.config, shift=row["scheduler_shift"]
    )
    guidance = {}
    if row["skip_guidance_layers"] is not None:
        keys = ("skip_guidance_layers", *SKIP_LAYER_GUIDANCE_KEYS)
        guidance = {key: row[key] for key in keys}
    inputs = {
        "negative_prompt": row["negative_prompt"],
        "num_inference_steps": row["num_inference_steps"],
        "guidance_scale": row["guidance_scale"],
        "width": row["width"],
        "height": row["height"],
        "max_sequence_length": row["max_sequence_length"],
        "generator": torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        **guidance,
    }
    image = pipe(row["prompt"], output_type="np", **{**inputs, **override}).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("drop_t5", [False, True], ids=["t5", "drop_t5"])
def test_sd3_rows_regenerate_with_plain_diffusers(tmp_path, tiny_sd3, s3, ray_cluster, drop_t5):
    """A non-square size on the 16-px grid; a prompt over CLIP's 77 tokens and the job's T5
    sequence, so each encoder's truncation shows; skip-layer guidance over the whole schedule, so
    it acts in three steps. With T5, the job sweeps its sequence length, so workers batch samples
    of two lengths and each row must say which one made it."""
    import numpy as np
    import pyarrow as pa

    from test_tasks import assert_close, run_job, three_ok

    lengths = [T5_TOKENS] if drop_t5 else [T5_TOKENS, 2 * T5_TOKENS]
    t5 = (
        {"generation": {"max_sequence_length": T5_TOKENS}}
        if drop_t5
        else {"sweep": {"seeds": 2, "axes": {"max_sequence_length": lengths}}}
    )
    table = pa.table({"prompt_id": ["a", "b"], "prompt": ["a red fox in snow", LONG]})
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_sd3,
        "text-to-image",
        table,
        model={
            "scheduler": "FlowMatchEulerDiscreteScheduler",
            "dtype": "float32",
            "drop_t5": drop_t5,
        },
        generation={
            "width": 64,
            "height": 48,
            "guidance_scale": 5.0,
            "skip_guidance_layers": [1],
            "skip_layer_guidance_start": 0.0,
            "skip_layer_guidance_stop": 1.0,
            **t5.get("generation", {}),
        },
        **({"sweep": t5["sweep"]} if "sweep" in t5 else {}),
    )
    # 1. What the rows record: each encoder's count (T5's against the call's sequence length, none
    #    where T5 was dropped), the call's sequence length, skip-layer guidance, the shift. Each
    #    (prompt, seed, length) is its own sample.
    assert len(rows) == 2 * 2 * len(lengths)
    made = sorted((r["prompt_id"], r["seed"], r["max_sequence_length"]) for r in rows.values())
    assert len(set(made)) == len(made)
    assert {r["max_sequence_length"] for r in rows.values()} == set(lengths)
    for row in rows.values():
        assert (row["width"], row["height"]) == (64, 48) and row["drop_t5"] is drop_t5
        assert row["scheduler_shift"] == 3.0
        assert row["skip_guidance_layers"] == [1] and row["skip_layer_guidance_scale"] == 2.8
        long = row["prompt"] == LONG
        assert row["prompt_truncated"] is long and row["prompt_truncated_2"] is long
        if drop_t5:
            assert row["prompt_tokens_3"] is None and row["prompt_truncated_3"] is None
        else:
            assert row["prompt_truncated_3"] is long
            assert row["prompt_truncated_3"] is (
                row["prompt_tokens_3"] > row["max_sequence_length"]
            )
    # 2. Rows from plain diffusers, each at its own T5 length.
    checked = three_ok(rows) if drop_t5 else [r for r in rows.values() if r["status"] == "ok"]
    assert {r["max_sequence_length"] for r in checked} == set(lengths)
    for row in checked:
        assert_close(images[row["key"]], regenerate(tiny_sd3, row))
    # 3. The recorded T5 length matters: another one is another image (with T5; without it, the
    #    zeros in its place are as long).
    row = three_ok(rows)[0]
    wrong = regenerate(tiny_sd3, row, max_sequence_length=T5_TOKENS * 2)
    assert np.abs(images[row["key"]].astype(int) - wrong.astype(int)).max() > 2


def test_the_sd35_medium_example_fits_medium_and_not_large():
    """jobs/examples/sd35_medium_1024.yaml as written, checked against SD3.5 Medium's and Large's
    transformer configs (num_layers 24 and 38), as pre-flight checks them."""
    from pathlib import Path

    from sdfleet.schemas.errors import SpecError
    from sdfleet.schemas.family_spec import call_inputs, check_family_spec
    from sdfleet.schemas.spec import load_spec

    path = Path(__file__).resolve().parents[1] / "jobs" / "examples" / "sd35_medium_1024.yaml"
    spec = load_spec(path)
    assert spec.model.dtype == SD3.dtype and spec.generation.skip_guidance_layers == [7, 8, 9]
    medium = {"num_layers": 24, "sample_size": 128}
    check_family_spec(spec, SD3, medium, spec.model.source)
    assert call_inputs(SD3, medium, spec.generation) == {
        "max_sequence_length": 256,
        "skip_guidance_layers": [7, 8, 9],
        "skip_layer_guidance_scale": 2.8,
        "skip_layer_guidance_start": 0.01,
        "skip_layer_guidance_stop": 0.2,
    }
    with pytest.raises(SpecError, match=r"an sd3 \(sd3\.5-large\) checkpoint, which has no skip"):
        check_family_spec(spec, SD3, {"num_layers": 38}, spec.model.source)


def test_sd3_image_to_image_plans_and_refuses_skip_layer_guidance(tmp_path, tiny_sd3):
    """The plain SD3 checkpoint runs image-to-image (no UNet channels to tell tasks apart: the
    family's pipelines say), and skip-layer guidance is text-to-image's only."""
    import io

    import yaml
    from PIL import Image

    from helpers import run_cli, write_prompts

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "gray").save(buffer, format="PNG")
    png = buffer.getvalue()
    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"], image=[png, png])
    spec = {
        "input": {"uri": str(tmp_path / "in"), "image_column": "image"},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(tiny_sd3), "task": "image-to-image"},
        "safety": {"detector": "none"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 0, out.stderr
    spec["generation"] = {"skip_guidance_layers": [1]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    err = _refused("plan", str(tmp_path / "job.yaml"))
    assert (
        "generation.skip_guidance_layers=[1]: sd3's image-to-image pipeline "
        "(StableDiffusion3Img2ImgPipeline) has no skip-layer guidance" in err
    ), err


@pytest.mark.parametrize("task", ["image-to-image", "inpaint"])
def test_the_engine_makes_an_sd3_image_task_at_its_inputs_size(tiny_sd3, task):
    """SD3's image-to-image and inpaint pipelines (on the plain checkpoint: no 9-channel variant)
    make their native size unless told the input's: the engine passes the input's size on the
    16-px grid (an 88x56 input makes 80x48, not the tiny's 64²), and the image is plain
    diffusers' with those keywords."""
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.samples import GenerationParams, InputImage
    from sdfleet.schemas.spec import GenerationSpec, ModelSpec

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (56, 88, 3), np.uint8))
    mask = Image.fromarray(np.where(rng.random((56, 88)) > 0.5, 255, 0).astype(np.uint8))
    model = ModelSpec(source=str(tiny_sd3), task=task, scheduler=None, dtype="float32")
    engine = Engine(model, batch_size=1, generation=GenerationSpec(max_sequence_length=16))
    classes = {
        "image-to-image": "StableDiffusion3Img2ImgPipeline",
        "inpaint": "StableDiffusion3InpaintPipeline",
    }
    assert type(engine.pipe).__name__ == classes[task]
    params = GenerationParams("a cat", "", 5, 3, 5.0, None, None, None, strength=0.8)
    params.image = InputImage(photo, "sha")
    params.mask = InputImage(mask, "mask") if task == "inpaint" else None
    (_, (image,), _), *_ = list(engine.generate([params]))
    assert image.shape == (48, 80, 3)
    plain = getattr(diffusers, classes[task]).from_pretrained(tiny_sd3, use_safetensors=True)
    plain.set_progress_bar_config(disable=True)
    extra = {"mask_image": mask} if task == "inpaint" else {}
    ref = plain(
        "a cat",
        negative_prompt="",
        image=photo,
        strength=0.8,
        num_inference_steps=3,
        guidance_scale=5.0,
        width=80,
        height=48,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        **extra,
    ).images[0]
    ref = (ref * 255).round().astype(np.uint8)
    assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2
