"""The SD2 family as dataset jobs: 768-v, image-to-image, inpaint, depth-to-image and the x4
upscaler, each through `sdfleet run` on Ray with its input and output on the local S3 server,
each row regenerated with the plain diffusers pipeline class from the row's values alone."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from helpers import job_dict, run_cli, write_spec

# Real photographs from scikit-image's package, cut to the tiny models' sizes.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, side: int) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side), Image.LANCZOS)


def png(image: Image.Image) -> bytes:
    return encoded(image, "PNG")


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=format, **options)
    return buf.getvalue()


def tiff_with_bad_bytes(image: Image.Image) -> bytes:
    """A TIFF of the photo whose strip data and tags past the header are overwritten."""
    data = bytearray(encoded(image, "TIFF"))
    data[16:-16] = bytes((i * 37) % 251 for i in range(len(data) - 32))
    return bytes(data)


def mask_for(i: int, side: int) -> Image.Image:
    """White (repaint) over a different quarter of each image."""
    mask = Image.new("L", (side, side), 0)
    x, y = (i % 2) * side // 2, (i // 2 % 2) * side // 2
    mask.paste(255, (x, y, x + side // 2, y + side // 2))
    return mask


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from sdfleet.jobs.tiny import TINY_SD2_VARIANTS, write_tiny_pipeline

    root = tmp_path_factory.mktemp("family")
    return {v: write_tiny_pipeline(root / v, v) for v in TINY_SD2_VARIANTS}


def run_job(tmp_path, s3, address, source, task, table, extra_files=(), /, **sections):
    """Write `table` (and `extra_files`: key -> bytes, beside it) to the bucket, run the job, and
    return (its rows by key, its images by key, the input's bytes by name). `sections` (model=...
    too) are merged into the spec."""
    prefix = f"{s3.bucket}/in-{uuid.uuid4().hex[:6]}"
    with s3.open(f"{prefix}/rows.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=2)
    for name, data in dict(extra_files).items():
        s3.pipe(f"{prefix}/{name}", data)
    out = f"{s3.bucket}/out-{uuid.uuid4().hex[:6]}"
    spec = job_dict(
        source,
        f"s3://{prefix}/",
        f"s3://{out}",
        name=f"task-{task}",
        model={"task": task, "scheduler": "EulerDiscreteScheduler"},
        generation={"num_inference_steps": 3},
        sweep={"seeds": 2},
        output={"image_format": "png", "samples_per_shard": 4},
        resources={"batch_size": 2, "max_workers": 2},
    )
    done = run_cli(
        "run", str(write_spec(tmp_path, spec, **sections)), "--address", address, "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows, images = {}, {}
    for name in sorted(s3.glob(f"{out}/*.parquet")):
        with s3.open(name, "rb") as f:
            rows.update({r["key"]: r for r in pq.read_table(f).to_pylist()})
    for name in sorted(s3.glob(f"{out}/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(s3.cat_file(name))) as tar:
            images.update(
                {
                    m.name.split(".")[0]: np.asarray(Image.open(tar.extractfile(m)))
                    for m in tar.getmembers()
                    if m.name.endswith(".png")
                }
            )
    return rows, images, prefix


def plain(pipeline_class: str, model):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(model, use_safetensors=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def regenerate(pipe, row, **inputs) -> np.ndarray:
    """The row's image from plain diffusers and the row's own values."""
    import torch

    image = pipe(
        row["prompt"],
        negative_prompt=row["negative_prompt"],
        num_inference_steps=row["num_inference_steps"],
        guidance_scale=row["guidance_scale"],
        output_type="np",
        generator=torch.Generator(row["generator_device"]).manual_seed(row["seed"]),
        **inputs,
    ).images[0]
    return (image * 255).round().astype(np.uint8)


def input_bytes(s3, table: pa.Table, row: dict, column: str) -> bytes:
    """The bytes the row's input came from: inline in the table, or the object its URI names."""
    if row[f"{column}_uri"]:
        data = s3.cat_file(row[f"{column}_uri"].removeprefix("s3://"))
    else:
        cells = table.column("image" if column == "input_image" else "mask").to_pylist()
        data = next(
            c
            for c in cells
            if isinstance(c, bytes) and hashlib.sha256(c).hexdigest() == row[f"{column}_sha256"]
        )
    assert hashlib.sha256(data).hexdigest() == row[f"{column}_sha256"]
    return data


def decoded(data: bytes, mode: str) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(mode)


def three_ok(rows: dict) -> list[dict]:
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) >= 3
    return [ok[0], ok[len(ok) // 2], ok[-1]]


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


# ------------------------------------------------------------------------------------- 768-v


@pytest.mark.slow
def test_768_v_makes_its_own_size_and_keeps_v_prediction(tmp_path, family, s3, ray_cluster):
    """No width or height in the spec: the checkpoint's size (96 for the tiny 768-style model);
    Euler from the checkpoint's config keeps prediction_type=v_prediction."""
    table = pa.table(
        {"prompt_id": ["a", "b"], "prompt": ["a lighthouse at dusk", "a red fox in snow"]}
    )
    rows, images, _ = run_job(
        tmp_path, s3, ray_cluster.address, family["768-v"], "text-to-image", table
    )
    assert {(r["width"], r["height"]) for r in rows.values()} == {(96, 96)}
    assert {r["task"] for r in rows.values()} == {"text-to-image"}
    pipe = plain("StableDiffusionPipeline", family["768-v"])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for row in three_ok(rows):
        size = dict(width=row["width"], height=row["height"])
        assert_close(images[row["key"]], regenerate(pipe, row, **size))
    # The objective matters: the same row read as epsilon-prediction is another image.
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, prediction_type="epsilon"
    )
    row = three_ok(rows)[0]
    wrong = regenerate(pipe, row, width=96, height=96)
    assert np.abs(images[row["key"]].astype(int) - wrong.astype(int)).max() > 2


# ------------------------------------------------------------------------------ image tasks


def image_table(side: int, masks: bool, uris: bool) -> tuple[pa.Table, dict[str, bytes]]:
    """Four rows of photos: inline as encoded bytes (a binary column), or as URIs relative to the
    input's folder (a string column; one in a subfolder, one an absolute s3:// URI added later)."""
    encoded = [png(photo(name, side)) for name in PHOTOS]
    names = ["astronaut.png", "photos/chelsea.png", "photos/coffee.png", "rocket.png"]
    columns = {
        "prompt_id": ["p0", "p1", "p2", "p3"],
        "prompt": [
            "an oil painting",
            "a watercolour cat",
            "a cup of coffee, studio light",
            "a rocket at night",
        ],
        "image": pa.array(names, pa.string()) if uris else pa.array(encoded, pa.binary()),
    }
    if masks:
        columns["mask"] = pa.array([png(mask_for(i, side)) for i in range(4)], pa.binary())
    return pa.table(columns), dict(zip(names, encoded)) if uris else {}


TASK_CASES = {
    # task: (tiny variant, pipeline class, input side, inputs as URIs?, sweep axes)
    "image-to-image": (
        "base",
        "StableDiffusionImg2ImgPipeline",
        64,
        True,
        {"strength": [0.5, 0.9]},
    ),
    "inpaint": ("inpaint", "StableDiffusionInpaintPipeline", 64, False, {"strength": [1.0]}),
    "depth-to-image": ("depth", "StableDiffusionDepth2ImgPipeline", 64, False, {"strength": [0.7]}),
    "upscale": ("upscale", "StableDiffusionUpscalePipeline", 16, True, {"noise_level": [10, 40]}),
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_CASES))
def test_image_task_rows_regenerate_with_plain_diffusers(task, tmp_path, family, s3, ray_cluster):
    variant, pipeline_class, side, uris, axes = TASK_CASES[task]
    table, files = image_table(side, masks=task == "inpaint", uris=uris)
    input_spec = {"image_column": "image", **({"mask_column": "mask"} if task == "inpaint" else {})}
    rows, images, prefix = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        family[variant],
        task,
        table,
        files,
        input=input_spec,
        sweep={"seeds": 2, "axes": axes},
    )
    points = 2 * len(next(iter(axes.values())))
    assert len(rows) == 4 * points and {r["status"] for r in rows.values()} == {"ok"}
    assert {r["task"] for r in rows.values()} == {task}
    scale = 4 if task == "upscale" else 1
    assert {(r["width"], r["height"]) for r in rows.values()} == {(side * scale, side * scale)}
    by_uri = {r["input_image_uri"] for r in rows.values()}
    assert by_uri == ({f"s3://{prefix}/{name}" for name in files} if uris else {None})
    key = next(iter(axes))
    assert {r[key] for r in rows.values()} == set(axes[key])  # swept, and recorded per row

    pipe = plain(pipeline_class, family[variant])
    for row in three_ok(rows):
        inputs = {
            "image": decoded(input_bytes(s3, table, row, "input_image"), "RGB"),
            key: row[key],
        }
        if task == "inpaint":
            inputs["mask_image"] = decoded(input_bytes(s3, table, row, "mask_image"), "L")
        assert_close(images[row["key"]], regenerate(pipe, row, **inputs))


# ----------------------------------------------------------------------------------- bad input


def bomb() -> bytes:
    """A PNG of a few KB that decodes to 196M pixels, over twice Pillow's limit."""
    buf = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_bad_input_images_fail_their_rows_and_the_job_goes_on(tmp_path, family, s3, ray_cluster):
    good = png(photo("astronaut", 64))
    other = f"sdfleet-other-{uuid.uuid4().hex[:8]}"
    s3.mkdir(other)
    s3.pipe(f"{other}/secret.png", good)
    inside = {
        "good.png": good,
        "not-an-image.png": b"GIF89a but not really",
        "truncated.png": good[: len(good) // 2],
        "bomb.png": bomb(),
        "good.jpg": encoded(photo("coffee", 64), "JPEG"),
        "good.webp": encoded(photo("chelsea", 64), "WEBP"),
        # Formats outside the allowlist: EPS would run Ghostscript, TIFF is libtiff.
        "photo.eps": encoded(photo("rocket", 64), "EPS"),
        "photo.tiff": tiff_with_bad_bytes(photo("rocket", 64)),
    }
    cases = {  # prompt id: (image URI, mask)
        "good": ("good.png", png(mask_for(0, 64))),
        "good-jpeg": ("good.jpg", png(mask_for(1, 64))),
        "good-webp": ("good.webp", png(mask_for(2, 64))),
        "eps": ("photo.eps", png(mask_for(0, 64))),
        "tiff-bad-bytes": ("photo.tiff", png(mask_for(0, 64))),
        "nul-byte": ("good.png\x00.txt", png(mask_for(0, 64))),
        "not-an-image": ("not-an-image.png", png(mask_for(0, 64))),
        "truncated": ("truncated.png", png(mask_for(0, 64))),
        "bomb": ("bomb.png", png(mask_for(0, 64))),
        "mask-size": ("good.png", png(mask_for(0, 32))),
        "not-a-mask": ("good.png", b"\x89PNG but no more"),
        "missing": ("nowhere/missing.png", png(mask_for(0, 64))),
        "dot-dot": ("../outside.png", png(mask_for(0, 64))),
        "dot-dot-inside": ("photos/../good.png", png(mask_for(0, 64))),
        "other-bucket": (f"s3://{other}/secret.png", png(mask_for(0, 64))),
        "absolute-path": ("/etc/passwd", png(mask_for(0, 64))),
        "null-mask": ("good.png", None),
    }
    table = pa.table(
        {
            "prompt_id": list(cases),
            "prompt": [f"a picture, {k}" for k in cases],
            "image": pa.array([c[0] for c in cases.values()], pa.string()),
            "mask": pa.array([c[1] for c in cases.values()], pa.binary()),
        }
    )
    s3.pipe(f"{s3.bucket}/outside.png", good)  # exists, but outside the input's folder
    rows, images, prefix = run_job(
        tmp_path,
        s3,
        ray_cluster.address,
        family["inpaint"],
        "inpaint",
        table,
        inside,
        input={"image_column": "image", "mask_column": "mask"},
        sweep={"seeds": 1},
    )
    by_id = {r["prompt_id"]: r for r in rows.values()}
    assert set(by_id) == set(cases)
    for prompt_id in ("good", "dot-dot-inside"):  # a `..` that stays inside is the same file
        assert by_id[prompt_id]["input_image_uri"] == f"s3://{prefix}/good.png"
    expected = {
        "eps": "photo.eps looks like EPS",
        "tiff-bad-bytes": "photo.tiff looks like TIFF",
        "nul-byte": "holds the control character '\\x00'",
        "not-an-image": "looks like GIF",
        "truncated": "cannot be decoded",
        "bomb": "decompression bomb",
        "mask-size": "mask is 32x32 but its input image is 64x64",
        "not-a-mask": "mask is not a JPEG, PNG or WebP image Pillow can decode",
        "absolute-path": "outside the input's folder",
        "missing": f"input image s3://{prefix}/nowhere/missing.png does not exist",
        "dot-dot": "outside the input's folder",
        "other-bucket": "outside the input's folder",
        "null-mask": "mask is null",
    }
    for prompt_id, reason in expected.items():
        row = by_id[prompt_id]
        assert row["status"] == "failed" and reason in row["error"], (prompt_id, row["error"])
        assert row["key"] not in images
    for prompt_id in set(cases) - set(expected):  # every other row of the same shards is made
        assert by_id[prompt_id]["status"] == "ok" and by_id[prompt_id]["key"] in images
    # The failed rows still say what they were planned with.
    assert by_id["bomb"]["seed"] is not None and by_id["bomb"]["task"] == "inpaint"


def test_a_checkpoint_that_does_not_fit_the_task_is_refused_before_any_worker(
    tmp_path, family, tiny_model
):
    """`sdfleet plan` (no Ray, no GPU) names the task, the pipeline class and what the checkpoint is."""
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table(
            {
                "prompt_id": ["a"],
                "prompt": ["x"],
                "image": pa.array([b"a.png"], pa.binary()),
                "mask": pa.array([b"m.png"], pa.binary()),
            }
        ),
        tmp_path / "in" / "p.parquet",
    )
    cases = [
        (
            "inpaint",
            tiny_model,
            "model.task=inpaint loads StableDiffusionInpaintPipeline, which needs a 9-channel UNet",
            "is a StableDiffusionPipeline with a 4-channel UNet",
        ),
        (
            "text-to-image",
            family["inpaint"],
            "needs a 4-channel UNet",
            "is a StableDiffusionInpaintPipeline with a 9-channel UNet; it is made for model.task: inpaint",
        ),
        (
            "image-to-image",
            family["depth"],
            "needs a 4-channel UNet",
            "made for model.task: depth-to-image",
        ),
        (
            "upscale",
            family["base"],
            "needs a 7-channel UNet and a low_res_scheduler",
            "4-channel UNet",
        ),
    ]
    for task, model, needs, found in cases:
        spec = job_dict(model, tmp_path / "in", tmp_path / "out", model={"task": task})
        if task != "text-to-image":
            spec["input"]["image_column"] = "image"
        if task == "inpaint":
            spec["input"]["mask_column"] = "mask"
        write_spec(tmp_path, spec, "job.yaml")
        out = run_cli("plan", str(tmp_path / "job.yaml"))
        assert out.returncode == 1, (task, out.stdout)
        assert needs in out.stderr and found in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- input images, without Ray


def test_exif_orientation_is_applied_and_modes_are_explicit(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view) decodes as
    viewed; a palette PNG becomes RGB, an RGB mask becomes L."""
    from sdfleet.actors.inputs import InputImageReader

    wide = photo("chelsea", 64).resize((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    wide.save(buf, format="JPEG", exif=exif.tobytes())
    palette = io.BytesIO()
    wide.convert("P").save(palette, format="PNG")
    reader = InputImageReader(str(tmp_path))
    rotated, from_palette = reader.read([buf.getvalue(), palette.getvalue()], "input image")
    assert rotated.size == (32, 64) and rotated.pixels.mode == "RGB"
    assert from_palette.size == (64, 32) and from_palette.pixels.mode == "RGB"
    assert rotated.sha256 == hashlib.sha256(buf.getvalue()).hexdigest()
    (mask,) = reader.read([png(wide)], "mask", mask=True)
    assert mask.pixels.mode == "L"


def test_only_jpeg_png_and_webp_are_decoded(tmp_path):
    """The allowlist is Pillow's, checked before any decoder: EPS (Ghostscript) and TIFF (libtiff)
    are refused by their signature, however good their bytes; a camera's multi-picture JPEG is a
    JPEG. A URI with a control character is refused before anything is read."""
    from sdfleet.actors.inputs import InputImageReader

    image = photo("astronaut", 32)
    allowed = {
        "JPEG": encoded(image, "JPEG"),
        "PNG": png(image),
        "WEBP": encoded(image, "WEBP"),
        "MPO": encoded(image, "MPO", save_all=True, append_images=[image.rotate(90)]),
    }
    refused = {
        "EPS": encoded(image, "EPS"),
        "TIFF": encoded(image, "TIFF"),
        "GIF": encoded(image, "GIF"),
        "BMP": encoded(image, "BMP"),
    }
    reader = InputImageReader(str(tmp_path))
    found = reader.read([*allowed.values(), *refused.values()], "input image")
    for fmt, image_or_reason in zip(allowed, found):
        assert not isinstance(image_or_reason, str), (fmt, image_or_reason)
        assert image_or_reason.size == (32, 32)
    for fmt, reason in zip(refused, found[len(allowed) :]):
        assert reason.startswith(f"input image looks like {fmt} ("), reason
        assert "sdfleet decodes only JPEG, PNG or WebP images" in reason
    (tmp_path / "a.png").write_bytes(png(image))
    nul, escape, padded = reader.read(["a.png\x00.eps", "a\x1b[2J.png", " a.png\n"], "mask")
    assert nul == "mask URI 'a.png\\x00.eps' holds the control character '\\x00'; refusing it"
    assert "holds the control character '\\x1b'" in escape
    assert padded.uri == f"{tmp_path}/a.png"  # whitespace around a URI is not part of it


def test_local_uris_stay_inside_the_input_folder(tmp_path):
    from sdfleet.actors.inputs import InputImageReader

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png(photo("coffee", 16)))
    (tmp_path / "secret.png").write_bytes(png(photo("coffee", 16)))
    (folder / "sub" / "link.png").symlink_to(tmp_path / "secret.png")
    reader = InputImageReader(str(folder / "prompts.parquet"))  # a file: its folder is the root
    found = reader.read(
        [
            "a.png",
            "sub/../a.png",
            str(folder / "a.png"),
            "../secret.png",
            str(tmp_path / "secret.png"),
            "sub/link.png",
            "s3://bucket/a.png",
            "",
            42,
        ],
        "input image",
    )
    assert [f.uri for f in found[:3]] == [f"{folder}/a.png"] * 3
    for reason in found[3:7]:
        assert isinstance(reason, str) and "outside the input's folder" in reason, reason
    assert "is '': give encoded image bytes or a URI" in found[7] and "is 42" in found[8]


# --------------------------------------------------------- an earlier output as the input: two jobs


@pytest.mark.slow
def test_two_stage_example_upscales_the_first_jobs_ok_images(tmp_path, family, s3, ray_cluster):
    """jobs/examples' pair at tiny size: 32² text-to-image, then the x4 upscaler over its ok images;
    the second job's rows point at the first's keys, and rerunning it generates nothing."""
    from helpers import REPO

    examples = REPO / "jobs" / "examples"
    prompts = ["a lighthouse", "", "a red fox", "a city at night"]  # the empty one fails in stage 1
    table = pa.table({"prompt_id": [f"p{i}" for i in range(4)], "prompt": prompts})
    with s3.open(f"{s3.bucket}/prompts/p.parquet", "wb") as f:
        pq.write_table(table, f)
    out1, out2 = f"s3://{s3.bucket}/two/512", f"s3://{s3.bucket}/two/2048"
    tiny = [
        "generation.num_inference_steps=3",
        "safety.detector=none",
        "output.samples_per_shard=3",
        "resources.batch_size=2",
        "resources.max_workers=2",
    ]
    sets = lambda *pairs: [a for p in (*pairs, *tiny) for a in ("--set", p)]  # noqa: E731
    first = run_cli(
        "run",
        str(examples / "sd2_base_512.yaml"),
        "--address",
        ray_cluster.address,
        "--no-progress",
        *sets(
            f"model.source={family['base']}",
            f"input.uri=s3://{s3.bucket}/prompts/",
            f"output.uri={out1}",
            "generation.width=32",
            "generation.height=32",
        ),
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second_args = (
        "run",
        str(examples / "sd2_x4_upscale_2048.yaml"),
        "--address",
        ray_cluster.address,
        "--no-progress",
        *sets(f"model.source={family['upscale']}", f"input.uri={out1}", f"output.uri={out2}"),
    )
    second = run_cli(*second_args)
    assert second.returncode == 0, second.stderr[-3000:]

    def rows_at(uri):
        found = {}
        for name in sorted(s3.glob(f"{uri.removeprefix('s3://')}/*.parquet")):
            with s3.open(name, "rb") as f:
                found.update({r["key"]: r for r in pq.read_table(f).to_pylist()})
        return found

    stage1, stage2 = rows_at(out1), rows_at(out2)
    ok1 = {k: r for k, r in stage1.items() if r["status"] == "ok"}
    assert len(stage1) == 8 and len(ok1) == 6  # 4 prompts x 2 seeds; the empty prompt's two fail
    assert len(stage2) == 6 and {r["status"] for r in stage2.values()} == {"ok"}
    assert {r["source_key"] for r in stage2.values()} == set(ok1)
    for r in stage2.values():
        source = ok1[r["source_key"]]
        assert r["source_output"] == out1 and r["source_image_sha256"] == source["image_sha256"]
        assert r["input_image_sha256"] == source["image_sha256"] and r["prompt"] == source["prompt"]
        assert (
            (r["width"], r["height"]) == (128, 128)
            and r["task"] == "upscale"
            and r["noise_level"] == 20
        )
        assert r["prompt_id"] == r["source_key"]

    # One row regenerates from the first job's image with the plain upscaler.
    row = next(iter(stage2.values()))
    shard = row["source_key"][:5]
    with tarfile.open(
        fileobj=io.BytesIO(s3.cat_file(f"{out1.removeprefix('s3://')}/{shard}.tar"))
    ) as tar:
        source_png = tar.extractfile(f"{row['source_key']}.png").read()
    with tarfile.open(
        fileobj=io.BytesIO(s3.cat_file(f"{out2.removeprefix('s3://')}/{row['key'][:5]}.tar"))
    ) as tar:
        ours = np.asarray(Image.open(tar.extractfile(f"{row['key']}.png")))
    import diffusers

    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(
        family["upscale"], use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert (
        row["scheduler"] == type(pipe.scheduler).__name__
    )  # scheduler: null keeps the checkpoint's
    assert_close(
        ours,
        regenerate(pipe, row, image=decoded(source_png, "RGB"), noise_level=row["noise_level"]),
    )

    again = run_cli(*second_args)
    assert again.returncode == 0 and "nothing to generate" in again.stderr, again.stderr[-2000:]


def test_an_unfinished_output_is_not_an_input(tmp_path, family, s3):
    """A source output without _SUCCESS (its job still running or failed) is refused by `plan`."""
    from sdfleet.schemas import layout

    s3.pipe(
        f"{s3.bucket}/src/{layout.JOB_FILE}",
        b'{"fingerprint": "x", "num_shards": 2, "num_samples": 4, '
        b'"key_width": 5, "spec": {"name": "stage1"}}',
    )
    spec = job_dict(
        family["upscale"], f"s3://{s3.bucket}/src", tmp_path / "out", model={"task": "upscale"}
    )
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert (
        out.returncode == 1
        and "is an sdfleet output that is not complete (0 of 2 shards" in out.stderr
    ), out.stderr
    # ...and an image task without any images is named too.
    spec["input"] = {"uri": str(tmp_path / "in")}
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["x"]}), tmp_path / "in" / "p.parquet")
    write_spec(tmp_path, spec, "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert out.returncode == 1 and "model.task=upscale needs input.image_column" in out.stderr, (
        out.stderr
    )


def test_inpaint_from_an_earlier_output_gets_one_answer_with_or_without_a_mask_column(
    tmp_path, family
):
    """An output holds no masks: `plan` says so, in the same words, whether the spec names a mask
    column or not, and before waiting for the output to be complete."""
    from sdfleet.schemas import layout
    from sdfleet.schemas.tasks import MASKS_NOT_FROM_AN_OUTPUT

    source = tmp_path / "src"
    source.mkdir()
    (source / layout.JOB_FILE).write_text(
        '{"fingerprint": "x", "num_shards": 2, "num_samples": 4, "key_width": 5, '
        '"spec": {"name": "stage1"}}'
    )
    for input_section in ({}, {"mask_column": "mask"}):
        spec = job_dict(family["inpaint"], str(source), tmp_path / "out", model={"task": "inpaint"})
        spec["input"].update(input_section)
        write_spec(tmp_path, spec, "job.yaml")
        out = run_cli("plan", str(tmp_path / "job.yaml"))
        assert out.returncode == 1 and out.stderr.count("sdfleet: error") == 1, out.stderr
        error = out.stderr[out.stderr.index("sdfleet: error") :]  # a spec error lists its keys
        assert error.count(MASKS_NOT_FROM_AN_OUTPUT) == 1, error
        assert "not complete" not in error and "must not be set" not in error


def test_a_checkpoint_whose_configs_do_not_parse_is_refused_by_the_driver(tmp_path, tiny_model):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "unet" / "config.json").write_text("{ this is not json")
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["x"]}), tmp_path / "in" / "p.parquet")
    write_spec(tmp_path, job_dict(broken, tmp_path / "in", tmp_path / "out"), "job.yaml")
    out = run_cli("plan", str(tmp_path / "job.yaml"))
    assert (
        out.returncode == 1
        and f"cannot read unet/config.json of model.source {broken}" in out.stderr
    ), out.stderr
