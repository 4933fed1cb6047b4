"""model.vae, SDXL's component override: an fp16-fixed VAE (the tiny stand-in `sdfleet
tiny-models` writes) in place of the checkpoint's own. Checked by the driver before any worker
starts, loaded once per actor through the model cache (from the local S3 server here), recorded
per row and in the fingerprint; its rows regenerate with the plain StableDiffusionXLPipeline
given that VAE."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from test_sdxl import regenerate
from test_tasks import assert_close, run_job, three_ok


@pytest.fixture(scope="module")
def fixed_vae(tmp_path_factory):
    from sdfleet.jobs.tiny_sdxl import TINY_SDXL_VAE, write_tiny_sdxl_vae

    return write_tiny_sdxl_vae(tmp_path_factory.mktemp("vae") / TINY_SDXL_VAE)


def test_the_tiny_fixed_vae_is_an_sdxl_vae_that_needs_no_upcast(fixed_vae, tiny_sdxl):
    own = json.loads((tiny_sdxl["base"] / "vae" / "config.json").read_text())
    fixed = json.loads((fixed_vae / "config.json").read_text())
    assert fixed["_class_name"] == "AutoencoderKL" and fixed["force_upcast"] is False
    same_shape = ("block_out_channels", "latent_channels", "scaling_factor")
    assert {k: fixed[k] for k in same_shape} == {k: own[k] for k in same_shape}
    assert (fixed_vae / "diffusion_pytorch_model.safetensors").read_bytes() != (
        tiny_sdxl["base"] / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_the_decode_dtype_follows_diffusers_upcast_rule():
    """SDXL's pipelines decode a float16 VAE in float32 where its config says force_upcast; SD2's
    never upcast, and their rows have no such column."""
    from types import SimpleNamespace

    from sdfleet.actors.components import vae_decode_dtype
    from sdfleet.schemas.families import SD2, SDXL

    def vae(force_upcast):
        return SimpleNamespace(config=SimpleNamespace(force_upcast=force_upcast))

    assert vae_decode_dtype(SDXL, vae(True), "float16") == "float32"
    assert vae_decode_dtype(SDXL, vae(False), "float16") == "float16"
    assert vae_decode_dtype(SDXL, vae(True), "bfloat16") == "bfloat16"
    assert vae_decode_dtype(SD2, vae(True), "float16") is None


def test_the_fingerprint_and_schema_change_with_model_vae(tmp_path):
    from helpers import spec_dict
    from sdfleet.schemas.rows import VAE_COLUMNS, output_schema
    from sdfleet.schemas.spec import JobSpec

    base = spec_dict(input={"uri": "in"}, output={"uri": "out"})
    plain = JobSpec.model_validate(base)
    with_vae = JobSpec.model_validate(spec_dict(base, model={"vae": "s3://b/vae"}))
    pinned = JobSpec.model_validate(
        spec_dict(base, model={"vae": "s3://b/vae", "vae_revision": "abc"})
    )
    other = JobSpec.model_validate(spec_dict(base, model={"vae": "s3://b/other-vae"}))
    prints = {s.fingerprint() for s in (plain, with_vae, pinned, other)}
    assert len(prints) == 4
    # A job without model.vae keeps the fingerprint it had before the key existed.
    assert "model.vae" not in plain.fingerprint_fields()
    assert "model.vae_revision" not in with_vae.fingerprint_fields()
    assert not set(VAE_COLUMNS) & set(output_schema().names)
    assert output_schema(vae=True).names[-2:] == list(VAE_COLUMNS)


def test_the_driver_refuses_a_vae_it_cannot_use(tmp_path, tiny_sdxl, fixed_vae):
    """Each refusal names model.vae: missing, not a VAE, pickle weights only, other latents."""
    import shutil

    from sdfleet.jobs.checkpoint import check_vae, read_checkpoint
    from sdfleet.schemas.errors import ModelLoadError
    from sdfleet.schemas.spec import ModelSpec

    checkpoint = read_checkpoint(ModelSpec(source=str(tiny_sdxl["base"])))
    assert checkpoint.vae_latent_channels == 4
    pickled = shutil.copytree(fixed_vae, tmp_path / "pickled")
    (pickled / "diffusion_pytorch_model.safetensors").rename(
        pickled / "diffusion_pytorch_model.bin"
    )
    wide = shutil.copytree(fixed_vae, tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    cases = {
        tmp_path / "nowhere": "does not exist",
        tiny_sdxl["base"] / "unet": "holds a UNet2DConditionModel, not an AutoencoderKL config",
        tiny_sdxl["base"]: "holds no config.json, not an AutoencoderKL config",
        pickled: "holds only pickle weights (diffusion_pytorch_model.bin); sdfleet loads "
        "safetensors only",
        wide: "makes 16-channel latents, and model.source",
    }
    for folder, said in cases.items():
        with pytest.raises(ModelLoadError, match=r"^model\.vae ") as raised:
            check_vae(ModelSpec(source=str(tiny_sdxl["base"]), vae=str(folder)), checkpoint)
        assert said in str(raised.value), folder
    check_vae(ModelSpec(source=str(tiny_sdxl["base"]), vae=str(fixed_vae)), checkpoint)


def test_plan_exits_1_naming_model_vae(tmp_path, tiny_sdxl):
    import yaml

    from helpers import run_cli, write_prompts

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    spec = {
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(tiny_sdxl["base"]), "vae": str(tiny_sdxl["base"] / "unet")},
        "safety": {"detector": "none"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "model.vae " in out.stderr and "not an AutoencoderKL config" in out.stderr


@pytest.mark.slow
def test_sdxl_rows_with_model_vae_regenerate_with_that_vae(
    tmp_path, tiny_sdxl, fixed_vae, s3, ray_cluster
):
    """model.vae from the local S3 server: the rows name it, and plain diffusers given that VAE
    makes the same pixels; the checkpoint's own VAE makes other ones."""
    import diffusers

    vae_uri = f"s3://{s3.bucket}/models/{fixed_vae.name}"
    s3.put(str(fixed_vae), vae_uri.removeprefix("s3://"), recursive=True)
    table = pa.table({"prompt_id": ["a", "b"], "prompt": ["a red fox in snow", "a lighthouse"]})
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_sdxl["base"],
        "text-to-image",
        table,
        generation={"width": 64, "height": 48, "guidance_scale": 5.0},
        model={"vae": vae_uri},
    )
    # 1. The rows name the VAE, and the dtype it decoded in (float32 on the CPU).
    for row in rows.values():
        assert (row["vae_source"], row["vae_revision"]) == (vae_uri, None)
        assert row["vae_decode_dtype"] == row["dtype"] == "float32"
    # 2. Three rows from plain diffusers given that VAE; the checkpoint's own VAE differs.
    vae = diffusers.AutoencoderKL.from_pretrained(fixed_vae, use_safetensors=True)
    fixed = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl["base"], vae=vae, use_safetensors=True
    )
    own = diffusers.StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl["base"], use_safetensors=True
    )
    for pipe in (fixed, own):
        pipe.set_progress_bar_config(disable=True)
    for row in three_ok(rows):
        assert_close(images[row["key"]], regenerate(fixed, row))
        unfixed = regenerate(own, row)
        assert np.abs(images[row["key"]].astype(int) - unfixed.astype(int)).max() > 2


def test_model_vae_decodes_a_refined_image_too(tiny_sdxl, fixed_vae):
    """With model.refiner the refiner decodes, so model.vae must be its VAE too: the same module
    as the base's, and the refined pixels differ from those of the refiner's own VAE."""
    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.samples import GenerationParams
    from sdfleet.schemas.spec import ModelSpec

    refiner = {"source": str(tiny_sdxl["refiner"])}
    sample = GenerationParams("a fox", "", 3, 4, 5.0, 64, 64, None)
    images = {}
    for vae in (None, str(fixed_vae)):
        model = ModelSpec(source=str(tiny_sdxl["base"]), refiner=refiner, vae=vae)
        engine = Engine(model, batch_size=1)
        if vae is not None:
            assert engine.refiner.pipe.vae is engine.pipe.vae
            assert engine.pipe.vae.config.force_upcast is False
        (images[vae],) = engine.call([sample])
    assert np.abs(images[None].astype(int) - images[str(fixed_vae)].astype(int)).max() > 2
