"""`sdfleet plan` counts the image tasks' FLOPs at their inputs' real sizes: image-to-image at the
input's size and strength x steps, the x4 upscaler decoding to 4x its input's size from a latent of
its input's size. The expected figures are computed here from the SD2 row of the family table."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import job_dict, run_cli, write_spec

STEPS, GUIDANCE = 10, 7.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from sdfleet.jobs.tiny import write_tiny_pipeline

    root = tmp_path_factory.mktemp("image-flops")
    return {v: write_tiny_pipeline(root / v, v) for v in ("base", "upscale")}


def png(width: int, height: int, seed: int) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def sd2_tflop(width: int, height: int, steps: int, denoised_pixels: int | None = None) -> float:
    """SD2's figures (schemas/families.py), counted here: CFG's two denoiser passes per step over
    the denoised latent's pixels, one VAE decode at the output size, the text encoder."""
    from sdfleet.schemas.families import SD2

    f = SD2.flops
    denoised = (denoised_pixels or width * height) / f.pixels
    return (
        f.denoiser_tflop * 2 * steps * denoised
        + f.vae_decode_tflop * width * height / f.pixels
        + f.text_tflop
    )


def plan_per_image(tmp_path, source, task: str, sizes, **generation) -> tuple[float, float, str]:
    """`sdfleet plan` on a table of PNG inputs of the given sizes: its per-image range and the
    task line."""
    folder = tmp_path / f"{task}-{len(list(tmp_path.iterdir()))}"
    table = pa.table(
        {
            "prompt": [f"a photo {i}" for i in range(len(sizes))],
            "prompt_id": [f"p{i}" for i in range(len(sizes))],
            "image": pa.array([png(w, h, i) for i, (w, h) in enumerate(sizes)], pa.binary()),
        }
    )
    (folder / "in").mkdir(parents=True)
    pq.write_table(table, folder / "in" / "p.parquet")
    spec = job_dict(
        source,
        folder / "in",
        folder / "out",
        model={"task": task},
        input={"image_column": "image"},
        generation={"num_inference_steps": STEPS, "guidance_scale": GUIDANCE, **generation},
    )
    write_spec(folder, spec, "job.yaml")
    out = run_cli("plan", str(folder / "job.yaml"))
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("per image"))
    figures = [float(v) for v in re.findall(r"([0-9.e+-]+)(?= TFLOP| …)", line)]
    task_line = next(x for x in out.stdout.splitlines() if x.startswith("task"))
    return min(figures), max(figures), task_line


def test_plan_counts_image_tasks_at_their_inputs_sizes(tmp_path, models):
    # 1. image-to-image on 64² inputs at strength 0.5: 64², 5 of 10 steps.
    low, high, task_line = plan_per_image(
        tmp_path, models["base"], "image-to-image", [(64, 64)] * 3, strength=0.5
    )
    assert low == high == pytest.approx(sd2_tflop(64, 64, 5), rel=1e-3)
    assert "from the first shard's 3 inputs: 64x64 (3)" in task_line, task_line
    # 2. The x4 upscale of the same inputs: decoded at 256², denoised on a 64² latent (the
    #    latent of a 512² image at SD2's 8x VAE), all 10 steps: not image-to-image's figure.
    up, _, task_line = plan_per_image(tmp_path, models["upscale"], "upscale", [(64, 64)] * 3)
    assert up == pytest.approx(sd2_tflop(256, 256, STEPS, denoised_pixels=512 * 512), rel=1e-3)
    assert up > 10 * low and "(x4)" in task_line
    # 3. Inputs of two sizes: each counted at its own.
    low, high, task_line = plan_per_image(
        tmp_path, models["base"], "image-to-image", [(64, 64), (128, 96), (64, 64)], strength=1.0
    )
    assert low == pytest.approx(sd2_tflop(64, 64, STEPS), rel=1e-3)
    assert high == pytest.approx(sd2_tflop(128, 96, STEPS), rel=1e-3)
    assert "64x64 (2), 128x96 (1)" in task_line, task_line
