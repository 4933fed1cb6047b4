"""SDXL's image tasks and spec errors: an SDXL checkpoint with `model.task: image-to-image` loads
StableDiffusionXLImg2ImgPipeline (the refiner's own class, and the base's as an image task), and
its rows record what regeneration needs: the micro-conditioning as diffusers derives it from the
input image's size, and the aesthetic score a checkpoint that `requires_aesthetics_score` is
conditioned on. Sizes off the latent grid are refused before any worker starts, naming the
family."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from test_tasks import assert_close, decoded, input_bytes, photo, png, run_job, three_ok

# Off the 8-pixel grid on purpose: diffusers floors each side to it (72 x 48 here).
INPUT_SIZE = (75, 50)


def regenerate_image_task(pipe, row, image, **extra) -> np.ndarray:
    """An SDXL image task's row from plain diffusers: the recorded micro-conditioning and, where
    the row has one, the aesthetic score it was conditioned on (extra: the inpaint pipeline's
    mask, width and height)."""
    import diffusers
    import torch

    from sdfleet.schemas.families import SDXL
    from sdfleet.schemas.rows import SIZE_CONDITIONING_COLUMNS, conditioning_column

    pipe.scheduler = getattr(diffusers, row["scheduler"]).from_config(pipe.scheduler.config)
    conditioning = {name: tuple(row[name]) for name in SIZE_CONDITIONING_COLUMNS}
    aesthetic = {
        keyword: row[conditioning_column(keyword)]
        for keyword in SDXL.aesthetic_inputs()
        if row[conditioning_column(keyword)] is not None
    }
    out = pipe(
        row["prompt"],
        negative_prompt=row["negative_prompt"],
        image=image,
        strength=row["strength"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        output_type="np",
        **conditioning,
        **aesthetic,
        **extra,
    ).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["refiner", "base"])
def test_sdxl_image_to_image_rows_regenerate(variant, tmp_path, tiny_sdxl, s3, ray_cluster):
    import diffusers

    images_in = [png(photo(name, 80).resize(INPUT_SIZE)) for name in ("astronaut", "coffee")]
    table = pa.table(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["an oil painting", "a cup of coffee, studio light"],
            "image": pa.array(images_in, pa.binary()),
        }
    )
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_sdxl[variant],
        "image-to-image",
        table,
        input={"image_column": "image"},
        generation={"strength": 0.6, "guidance_scale": 5.0},
    )
    # 1. The size diffusers makes, and the micro-conditioning it derives from it, recorded.
    refiner = variant == "refiner"
    for row in rows.values():
        assert row["status"] == "ok" and (row["width"], row["height"]) == (72, 48)
        for name in ("original_size", "target_size", "negative_original_size"):
            assert row[name] == [48, 72], name
        assert row["crops_coords_top_left"] == [0, 0] and row["strength"] == 0.6
        aesthetic = (
            row["conditioning_aesthetic_score"],
            row["conditioning_negative_aesthetic_score"],
        )
        assert aesthetic == ((6.0, 2.5) if refiner else (None, None))
        # The refiner has text_encoder_2 alone: only its tokenizer counts.
        assert row["prompt_tokens_2"] > 0
        assert (row["prompt_tokens"] is None) is refiner
    # 2. Three rows from the plain img2img pipeline.
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_sdxl[variant], use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    for row in three_ok(rows):
        image = decoded(input_bytes(s3, table, row, "input_image"), "RGB")
        assert_close(images[row["key"]], regenerate_image_task(pipe, row, image))
    if refiner:  # the recorded aesthetic score matters
        row = three_ok(rows)[0]
        image = decoded(input_bytes(s3, table, row, "input_image"), "RGB")
        wrong = regenerate_image_task(pipe, {**row, "conditioning_aesthetic_score": 1.0}, image)
        assert np.abs(images[row["key"]].astype(int) - wrong.astype(int)).max() > 2


@pytest.mark.slow
def test_sdxl_inpaint_rows_regenerate(tmp_path, tiny_sdxl, s3, ray_cluster):
    """An SDXL inpainting checkpoint makes the input's size (its pipeline would make its native
    size unless told), conditioned on it; plain StableDiffusionXLInpaintPipeline regenerates."""
    import diffusers

    mask = Image.new("L", INPUT_SIZE, 0)
    mask.paste(255, (0, 0, INPUT_SIZE[0] // 2, INPUT_SIZE[1]))
    table = pa.table(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["an oil painting", "a cup of coffee, studio light"],
            "image": pa.array(
                [png(photo(name, 80).resize(INPUT_SIZE)) for name in ("astronaut", "coffee")],
                pa.binary(),
            ),
            "mask": pa.array([png(mask)] * 2, pa.binary()),
        }
    )
    rows, images, _ = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        tiny_sdxl["inpaint"],
        "inpaint",
        table,
        input={"image_column": "image", "mask_column": "mask"},
        generation={"strength": 0.9, "guidance_scale": 5.0},
    )
    for row in rows.values():
        assert row["status"] == "ok" and (row["width"], row["height"]) == (72, 48)
        assert row["original_size"] == row["target_size"] == [48, 72]
    pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(
        tiny_sdxl["inpaint"], use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    for row in three_ok(rows):
        image = decoded(input_bytes(s3, table, row, "input_image"), "RGB")
        mask_image = decoded(input_bytes(s3, table, row, "mask_image"), "L")
        ours = regenerate_image_task(
            pipe, row, image, mask_image=mask_image, width=row["width"], height=row["height"]
        )
        assert_close(images[row["key"]], ours)


def test_the_engine_loads_the_sdxl_class_for_an_image_task(tiny_sdxl):
    """The Engine, as a worker builds it: the base as an image-to-image checkpoint is an
    StableDiffusionXLImg2ImgPipeline, and the refiner (already one) gets its aesthetic score."""
    from sdfleet.actors.engine import Engine
    from sdfleet.schemas.families import SDXL
    from sdfleet.schemas.spec import ModelSpec

    for variant, aesthetic in (("base", {}), ("refiner", SDXL.aesthetic_inputs())):
        model = ModelSpec(source=str(tiny_sdxl[variant]), task="image-to-image")
        engine = Engine(model, device="cpu", batch_size=1)
        assert type(engine.pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
        assert engine.family is SDXL and engine.aesthetic_conditioning == aesthetic


def _plan(tmp_path, source, **sections):
    import yaml

    from helpers import run_cli, spec_dict, write_prompts

    write_prompts(tmp_path / "in" / "p.parquet", ["a cat", "a dog"])
    base = {
        "input": {"uri": str(tmp_path / "in")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"source": str(source)},
        "safety": {"detector": "none"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_dict(base, **sections)))
    return run_cli("plan", str(tmp_path / "job.yaml"))


def test_a_size_off_the_grid_is_refused_naming_the_family(tmp_path, tiny_sdxl, tiny_model):
    """Exit 1 before any worker starts: the key, the value, the checkpoint's family, the nearest
    sizes; a swept size too."""
    out = _plan(tmp_path / "a", tiny_sdxl["base"], generation={"width": 1001, "height": 1024})
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "generation.width=1001 is not divisible by 8, the latent grid of sdxl checkpoints; use "
        "e.g. 1000 or 1008" in out.stderr
    )
    out = _plan(tmp_path / "b", tiny_model, sweep={"axes": {"height": [512, 500]}})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "sweep.axes.height=500 is not divisible by 8, the latent grid of sd2" in out.stderr


@pytest.mark.slow
def test_the_sdedit_example_pair_refines_the_base_jobs_images(tmp_path, tiny_sdxl, s3, ray_cluster):
    """jobs/examples' SDXL pair at tiny size: the base at its native 64², then the refiner as an
    image-to-image job over the first job's ok images at strength 0.3; one row regenerates with
    the plain img2img pipeline from the first job's image."""
    import io
    import tarfile

    import diffusers
    import pyarrow.parquet as pq

    from helpers import REPO, run_cli

    examples = REPO / "jobs" / "examples"
    table = pa.table({"prompt_id": ["p0", "p1"], "prompt": ["a lighthouse", "a red fox"]})
    with s3.open(f"{s3.bucket}/prompts/p.parquet", "wb") as f:
        pq.write_table(table, f)
    out1, out2 = f"s3://{s3.bucket}/sdedit/base", f"s3://{s3.bucket}/sdedit/refined"
    tiny = [
        "generation.num_inference_steps=4",
        "safety.detector=none",
        "output.samples_per_shard=2",
        "resources.batch_size=2",
        "resources.max_workers=2",
    ]
    sets = lambda *pairs: [a for p in (*pairs, *tiny) for a in ("--set", p)]  # noqa: E731
    for example, source, uris in (
        ("sdxl_base_1024.yaml", tiny_sdxl["base"], (f"s3://{s3.bucket}/prompts/", out1)),
        ("sdxl_refiner_sdedit_1024.yaml", tiny_sdxl["refiner"], (out1, out2)),
    ):
        done = run_cli(
            "run",
            str(examples / example),
            "--address",
            ray_cluster.address,
            "--no-progress",
            *sets(f"model.source={source}", f"input.uri={uris[0]}", f"output.uri={uris[1]}"),
        )
        assert done.returncode == 0, done.stderr[-3000:]

    def rows_at(uri):
        found = {}
        for name in sorted(s3.glob(f"{uri.removeprefix('s3://')}/*.parquet")):
            with s3.open(name, "rb") as f:
                found.update({r["key"]: r for r in pq.read_table(f).to_pylist()})
        return found

    def tar_file(uri, key, ext):
        blob = s3.cat_file(f"{uri.removeprefix('s3://')}/{key[:5]}.tar")
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            return tar.extractfile(f"{key}.{ext}").read()

    base, refined = rows_at(out1), rows_at(out2)
    assert len(base) == 4 and {r["width"] for r in base.values()} == {64}
    assert len(refined) == 4 and {r["source_key"] for r in refined.values()} == set(base)
    for r in refined.values():
        assert r["task"] == "image-to-image" and r["strength"] == 0.3
        assert r["source_output"] == out1 and r["original_size"] == [64, 64]
        assert r["conditioning_aesthetic_score"] == 6.0
        assert r["input_image_sha256"] == base[r["source_key"]]["image_sha256"]
    row = next(iter(refined.values()))
    image = Image.open(io.BytesIO(tar_file(out1, row["source_key"], "png"))).convert("RGB")
    ours = np.asarray(Image.open(io.BytesIO(tar_file(out2, row["key"], "png"))))
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_sdxl["refiner"], use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert_close(ours, regenerate_image_task(pipe, row, image))
