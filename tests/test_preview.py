"""Previews of real outputs: contact sheet, X/Y grid, HTML gallery (checked in headless Chromium).

Two datasets are made once per module with the real CLI on embedded Ray: a 3 seeds x 3 guidance
sweep of two prompts plus an empty prompt (whose rows fail), with no detector; and the same job with
a tiny CLIP checker that flags everything under action=quarantine. Pixels in the previews are
compared with the images in the tars, read here with tarfile, not through the code under test.
Smaller outputs are written by hand (`synthetic_output`), among them one whose every string column
holds markup, to show the gallery keeps such values text.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import REPO, free_port, job_dict, run_cli, wait_for, write_prompts, write_spec
from sdfleet.jobs import preview
from sdfleet.jobs.output import OutputReader
from sdfleet.jobs.preview import PreviewError
from sdfleet.schemas import layout
from sdfleet.schemas.errors import UserError
from sdfleet.schemas.layout import ShardStats

PROMPTS = ["a lighthouse on a cliff at dawn", "a bowl of ramen, studio lighting", "   "]
GUIDANCE = [1.5, 4.0, 7.5]
SEEDS = 3
SIZE = 64
SCALE = 3  # 64 px images are enlarged x3 (nearest) to reach the 160 px minimum tile
WHITE = np.array([255, 255, 255])

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (CI: apt-get update && apt-get install -y chromium "
    "chromium-driver)",
)
needs_chromedriver = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium/ChromeDriver are not installed (CI: apt-get update && apt-get install -y chromium "
    "chromium-driver)",
)


# ------------------------------------------------------------------------------------ datasets


def make_dataset(root: Path, tiny_model: Path, safety: dict) -> Path:
    write_prompts(root / "prompts" / "p.parquet", PROMPTS)
    spec = job_dict(
        tiny_model,
        root / "prompts",
        root / "out",
        name="preview-test",
        model={"scheduler": "EulerDiscreteScheduler"},
        generation={"num_inference_steps": 2, "width": SIZE, "height": SIZE},
        sweep={"seeds": SEEDS, "axes": {"guidance_scale": GUIDANCE}},
        output={"image_format": "png", "samples_per_shard": 10},
        safety=safety,
        resources={"batch_size": 9, "max_workers": 1},
    )
    write_spec(root, spec, "job.yaml")
    done = run_cli("run", str(root / "job.yaml"), "--no-progress", env={"RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model) -> Path:
    return make_dataset(tmp_path_factory.mktemp("preview"), tiny_model, {"detector": "none"})


@pytest.fixture(scope="module")
def quarantined(tmp_path_factory, tiny_model) -> Path:
    from sdfleet.jobs.tiny import write_tiny_clip_checker

    root = tmp_path_factory.mktemp("preview-q")
    checker = write_tiny_clip_checker(root / "clip-everything", flag="everything")
    return make_dataset(
        root,
        tiny_model,
        {"detector": "clip-checker", "model": str(checker), "action": "quarantine"},
    )


def rows_of(out: Path, folder: str = "") -> list[dict]:
    rows = []
    for f in sorted((out / folder).glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def reader_of(out: Path) -> OutputReader:
    return OutputReader.open(str(out))


def tar_image(out: Path, key: str, folder: str = "") -> Image.Image:
    with tarfile.open(out / folder / f"{key[:-4]}.tar") as tar:
        return Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB")


def pixels(png) -> np.ndarray:
    return np.asarray(
        Image.open(io.BytesIO(png) if isinstance(png, bytes) else png).convert("RGB")
    ).astype(int)


def crop(a: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return a[y0:y1, x0:x1]


def enlarged(img: Image.Image) -> np.ndarray:
    return np.asarray(
        img.resize((img.width * SCALE, img.height * SCALE), Image.Resampling.NEAREST)
    ).astype(int)


def has_ink(region: np.ndarray) -> bool:
    """Text or image there: some pixels clearly darker than the white background."""
    return bool((region.sum(axis=-1) < 3 * 160).any())


def runs_of_content(line: np.ndarray, min_len: int) -> int:
    """Count runs of non-background pixels at least min_len long along one scanline."""
    content = np.abs(line - WHITE).sum(axis=-1) > 0
    runs, n = 0, 0
    for c in list(content) + [False]:
        if c:
            n += 1
        else:
            runs += n >= min_len
            n = 0
    return runs


# ------------------------------------------------------------------------------------ pure helpers


def test_grid_syntax_errors_are_clear():
    assert preview.parse_grid("x=guidance_scale,y=seed") == ("guidance_scale", "seed")
    assert preview.parse_grid(" y = seed , x = scheduler ") == ("scheduler", "seed")
    for bad in (
        "guidance_scale,seed",
        "x=guidance_scale",
        "x=a,y=b,z=c",
        "x=a,x=b",
        "x=,y=seed",
        "x=a b,y=c",
        "x=guidance_scale;y=seed",
    ):
        with pytest.raises(
            PreviewError, match=r"expected x=AXIS,y=AXIS, e.g. --grid x=guidance_scale,y=seed"
        ):
            preview.parse_grid(bad)


def test_images_below_the_minimum_scale_up_by_an_integer_and_above_the_maximum_down_to_it():
    assert preview.scale_factor(64, 160, 256) == 3.0
    assert preview.scale_factor(200, 160, 256) == 1.0
    assert preview.scale_factor(512, 160, 256) == 0.5


def test_hard_wrap_breaks_long_words_and_ends_the_last_line_with_an_ellipsis():
    f = preview.font(12)
    lines = preview.wrap(
        "seed=2168214285462722822 and a long tail of words " * 3, f, 100, 2, hard=True
    )
    assert len(lines) == 2 and lines[-1].endswith("…")
    assert all(f.getlength(line) <= 100 for line in lines)


def test_importing_preview_loads_no_torch_ray_tensorflow_or_diffusers():
    code = (
        "import sys, sdfleet.jobs.preview; heavy = [m for m in ('torch', 'ray', 'tensorflow', 'diffusers') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_preview_of_a_folder_without_a_job_record_is_refused(tmp_path):
    with pytest.raises(UserError, match=f"has no {layout.JOB_FILE}: it is not an sdfleet output"):
        preview.run_preview(str(tmp_path))


SYNTHETIC_SHARD = "00000"
SYNTHETIC_FINGERPRINT = "synthetic"


def synthetic_output(root: Path, samples: list[dict], spec: dict | None = None) -> Path:
    """A minimal committed output written by hand: one shard of solid-colour JPEGs (for ok rows),
    the Parquet columns preview reads, a job record and the shard's stats (which commit it)."""
    rows, buf = [], io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for offset, sample in enumerate(samples):
            row = {
                "key": f"{SYNTHETIC_SHARD}{offset:04d}",
                "shard_id": 0,
                "status": "ok",
                "prompt_id": "p0",
                "prompt": "a red square",
                "negative_prompt": "",
                "seed": 7,
                "guidance_scale": 7.5,
                "num_inference_steps": 20,
                "scheduler": "EulerDiscreteScheduler",
                "width": 64,
                "height": 64,
                "nsfw_score": None,
                "safety_flagged": None,
                "error": None,
                **sample,
            }
            rows.append(row)
            if row["status"] != "ok":
                continue
            img = io.BytesIO()
            Image.new("RGB", (row["width"], row["height"]), (40 * offset % 256, 90, 160)).save(
                img, "JPEG"
            )
            info = tarfile.TarInfo(f"{row['key']}.jpg")
            info.size = len(img.getvalue())
            tar.addfile(info, io.BytesIO(img.getvalue()))
    root.mkdir(parents=True)
    (root / layout.tar_file(SYNTHETIC_SHARD)).write_bytes(buf.getvalue())
    pq.write_table(pa.Table.from_pylist(rows), root / layout.parquet_file(SYNTHETIC_SHARD))
    spec = spec or {
        "name": "synthetic",
        "model": {"source": "synthetic-model"},
        "sweep": {"seeds": 1, "axes": {}},
    }
    job = {
        "spec": spec,
        "fingerprint": SYNTHETIC_FINGERPRINT,
        "num_samples": len(rows),
        "num_shards": 1,
        "samples_per_shard": len(rows),
        "key_width": len(SYNTHETIC_SHARD),
    }
    (root / layout.JOB_FILE).write_text(json.dumps(job))
    (root / layout.stats_file(SYNTHETIC_SHARD)).write_text(synthetic_stats(rows).model_dump_json())
    return root


def synthetic_stats(rows: list[dict]) -> ShardStats:
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "filtered")}
    return ShardStats(
        shard=SYNTHETIC_SHARD,
        shard_id=0,
        fingerprint=SYNTHETIC_FINGERPRINT,
        samples=len(rows),
        ok=count["ok"],
        filtered=count["filtered"],
        failed=len(rows) - count["ok"] - count["filtered"],
        images_in_tar=count["ok"],
        quarantined_images=0,
        flagged=0,
        flagged_by_class={},
        safety_detector="none",
        safety_model_sha256=None,
        attempt=1,
        batch_size=len(rows),
        engine_speed_ups=[],
        dtype="float32",
        device="cpu",
        worker_node="n",
        worker_id="w",
        gpu_id=None,
        gen_seconds=1.0,
        gpu_seconds=1.0,
        images_per_gpu_hour=None,
        wall_seconds=1.0,
        started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:00:01+00:00",
        started_ts=0.0,
        generate_started_ts=0.0,
        generate_finished_ts=1.0,
        finished_ts=1.0,
        tar_sha256="0" * 64,
        parquet_sha256="0" * 64,
    )


def test_previews_show_committed_shards_only(tmp_path):
    out = synthetic_output(tmp_path / "out", [{"seed": seed} for seed in (1, 2)])
    assert len(preview.read_preview_meta(preview.contact_sheet(reader_of(out)))["tiles"]) == 2
    # Without its stats file the shard is not committed (a writer may still be at it): nothing shows.
    (out / layout.stats_file(SYNTHETIC_SHARD)).unlink()
    assert preview.read_preview_meta(preview.contact_sheet(reader_of(out)))["tiles"] == []
    with pytest.raises(PreviewError, match="has no committed shard yet"):
        preview.xy_grid(reader_of(out), "seed", "guidance_scale")


def test_xy_grid_scales_all_cells_alike_and_holds_a_third_axis(tmp_path):
    samples = [
        {"width": w, "scheduler": sch, "seed": seed}
        for w in (64, 128)
        for sch in ("EulerDiscreteScheduler", "DDIMScheduler")
        for seed in (1, 2)
    ]
    out = synthetic_output(tmp_path / "out", samples)
    png = preview.xy_grid(reader_of(out), "width", "seed")
    meta = preview.read_preview_meta(png)
    # 128 px is the largest side: every image is enlarged x2 (nearest), so sizes stay comparable.
    assert meta["factor"] == 2.0 and meta["x_values"] == [64, 128] and meta["y_values"] == [1, 2]
    assert meta["held"] == {"scheduler": "EulerDiscreteScheduler"}  # the first sample's value
    cells = {(c["i"], c["j"]): c for c in meta["cells"]}
    for j in range(2):
        narrow, wide = cells[0, j]["box"], cells[1, j]["box"]
        assert (narrow[2] - narrow[0], narrow[3] - narrow[1]) == (128, 128)
        assert (wide[2] - wide[0], wide[3] - wide[1]) == (256, 128)
    keys = {c["key"] for c in meta["cells"]}
    assert keys == {
        "000000000",
        "000000001",
        "000000004",
        "000000005",
    }  # EulerDiscreteScheduler rows only
    with pytest.raises(PreviewError, match="columns that vary: seed, scheduler, width"):
        preview.xy_grid(reader_of(out), "height", "seed")


def test_gallery_escapes_prompt_text_and_keeps_seeds_exact(tmp_path):
    evil = 'a cat</script><script>alert(1)</script><img src=x onerror="alert(2)"> & <!-- ok'
    out = synthetic_output(tmp_path / "out", [{"prompt": evil, "seed": 2**62 + 1}])
    page = Path(preview.html_gallery(reader_of(out))).read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    blob = page.split('<script id="rows" type="application/json">', 1)[1].split("</script>", 1)[0]
    (row,) = json.loads(blob)
    assert row["prompt"] == evil and row["seed"] == str(
        2**62 + 1
    )  # a string: JS numbers would round it
    assert page.count("<img ") == 1 and "data:image/jpeg;base64," in page


def test_gallery_writes_passthrough_decimals_times_and_durations_as_the_tars_do(tmp_path):
    import datetime as dt
    import decimal

    extra = {
        "price": decimal.Decimal("-1.20"),
        "tod": dt.time(12, 30),
        "wait": dt.timedelta(minutes=1),
        "ratio": float("nan"),
    }
    out = synthetic_output(tmp_path / "out", [extra])
    page = Path(preview.html_gallery(reader_of(out))).read_text()
    blob = page.split('<script id="rows" type="application/json">', 1)[1].split("</script>", 1)[0]
    (row,) = json.loads(blob, parse_constant=lambda token: pytest.fail(f"{token} in the JSON"))
    assert row["price"] == "-1.20" and row["tod"] == "12:30:00.000000"
    assert row["wait"] == "PT60.000000S" and row["ratio"] is None


# ------------------------------------------------------------------------------------ contact sheet


@pytest.mark.slow
def test_contact_sheet_shows_n_tiles_with_the_right_images(dataset):
    rows = rows_of(dataset)
    assert [r["status"] for r in rows].count("ok") == 18 and [r["status"] for r in rows].count(
        "failed"
    ) == 9
    png = preview.contact_sheet(reader_of(dataset), limit=16)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = pixels(png)
    meta = preview.read_preview_meta(png)
    tiles = meta["tiles"]
    assert len(tiles) == 16 and all(t["shown"] and t["status"] == "ok" for t in tiles)
    keys = [t["key"] for t in tiles]
    assert keys == sorted(keys)
    ok_by_key = {r["key"]: r for r in rows if r["status"] == "ok"}
    assert set(keys) <= set(ok_by_key)
    # Both prompts are on the sheet (one image of each prompt first, then fill in key order).
    assert {ok_by_key[k]["prompt_id"] for k in keys} == {"p000", "p001"}
    # 4 x 4 tiles of 192 px (64 px x 3) with 12 px margins and gaps.
    tile = SIZE * SCALE
    assert sheet.shape[1] == 2 * 12 + 4 * tile + 3 * 12
    assert sheet.shape[0] > 4 * tile + 4 * 3 * 14
    # Counted from the pixels alone: one scanline through each tile row crosses 4 image-wide blocks.
    row_centres = sorted({(t["box"][1] + t["box"][3]) // 2 for t in tiles})
    assert len(row_centres) == 4
    assert sum(runs_of_content(sheet[y], tile - 2) for y in row_centres) == 16
    for t in tiles:
        assert t["box"][2] - t["box"][0] == tile and t["box"][3] - t["box"][1] == tile
        assert np.array_equal(crop(sheet, t["box"]), enlarged(tar_image(dataset, t["key"]))), t[
            "key"
        ]
        x0, _, x1, y1 = t["box"]
        assert has_ink(sheet[y1 + 4 : y1 + 50, x0:x1]), f"no caption under {t['key']}"
    # Tiles go left to right, top to bottom, without overlapping.
    order = sorted(tiles, key=lambda t: (t["box"][1], t["box"][0]))
    assert [t["key"] for t in order] == keys


@pytest.mark.slow
def test_contact_sheet_shows_at_most_limit_images_and_writes_to_out_path(dataset, tmp_path):
    reader = reader_of(dataset)
    everything = preview.read_preview_meta(preview.contact_sheet(reader, limit=100))
    assert len(everything["tiles"]) == 18  # every ok image, never the failed rows
    written = preview.contact_sheet(reader, str(tmp_path / "sheet.png"), limit=4)
    assert written == str(tmp_path / "sheet.png")
    assert len(preview.read_preview_meta((tmp_path / "sheet.png").read_bytes())["tiles"]) == 4
    small = preview.small_contact_sheet(reader)
    meta = preview.read_preview_meta(small)
    assert len(meta["tiles"]) == 16
    assert (
        Image.open(io.BytesIO(small)).width
        < Image.open(io.BytesIO(preview.contact_sheet(reader, limit=16))).width
    )


# ------------------------------------------------------------------------------------ X/Y grid


def check_grid(png: bytes, out: Path, prompt_id: str, x: str, y: str) -> dict:
    """The grid's geometry, headers, and that each cell holds the image of its (x, y) sample."""
    grid = pixels(png)
    meta = preview.read_preview_meta(png)
    rows = [r for r in rows_of(out) if r["prompt_id"] == prompt_id]
    seeds = list(dict.fromkeys(r["seed"] for r in rows))  # seed index order
    # Every image differs (guidance changes the tiny model's pixels a little), so a cell that holds
    # a neighbour's image fails the exact comparison below.
    ok = [r for r in rows if r["status"] == "ok"]
    assert len({r["image_sha256"] for r in ok}) == len(ok)
    expected = {"guidance_scale": GUIDANCE, "seed": seeds}
    assert meta["x"] == x and meta["y"] == y and meta["prompt_id"] == prompt_id
    assert meta["x_values"] == expected[x] and meta["y_values"] == expected[y]
    cells = {(c["i"], c["j"]): c for c in meta["cells"]}
    assert len(cells) == 9
    tile = SIZE * SCALE
    for (i, j), cell in cells.items():
        x0, y0, x1, y1 = cell["box"]
        assert (x1 - x0, y1 - y0) == (tile, tile)
        # Columns share x, rows share y, in value order, with a gap between them.
        assert x0 == cells[i, 0]["box"][0] and y0 == cells[0, j]["box"][1]
        if i:
            assert x0 >= cells[i - 1, j]["box"][2]
        if j:
            assert y0 >= cells[i, j - 1]["box"][3]
        # The sample drawn there is the one with that x and y (found here from the Parquet alone).
        want = next(r for r in rows if r[x] == expected[x][i] and r[y] == expected[y][j])
        assert cell["key"] == want["key"] and cell["status"] == want["status"]
        if want["status"] == "ok":
            assert cell["shown"]
            assert np.array_equal(crop(grid, cell["box"]), enlarged(tar_image(out, want["key"]))), (
                i,
                j,
            )
    # Headers: ink above every column and left of every row, none over the cells' gaps.
    top = min(c["box"][1] for c in cells.values())
    left = min(c["box"][0] for c in cells.values())
    for i in range(3):
        x0, _, x1, _ = cells[i, 0]["box"]
        assert has_ink(grid[top - 30 : top - 2, x0:x1]), f"no header over column {i}"
    for j in range(3):
        _, y0, _, y1 = cells[0, j]["box"]
        assert has_ink(grid[y0:y1, 16 : left - 4]), f"no header left of row {j}"
    assert has_ink(grid[10:40, 16:300])  # the title (the prompt)
    return meta


@pytest.mark.slow
def test_xy_grid_puts_each_sample_in_its_cell(dataset):
    reader = reader_of(dataset)
    check_grid(
        preview.xy_grid(reader, "guidance_scale", "seed"), dataset, "p000", "guidance_scale", "seed"
    )
    # Transposed, and for the second prompt, whose samples straddle two shards (keys 9..17).
    meta = check_grid(
        preview.xy_grid(reader, "seed", "guidance_scale", prompt_id="p001"),
        dataset,
        "p001",
        "seed",
        "guidance_scale",
    )
    assert {c["key"][:-4] for c in meta["cells"]} == {"00000", "00001"}


@pytest.mark.slow
def test_xy_grid_draws_labelled_placeholders_for_missing_cells(dataset, tmp_path):
    # A copy of the output in which one sample of p000 failed at generation (its parameters kept).
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    table = pq.read_table(copy / "00000.parquet")
    rows = table.to_pylist()
    broken = rows[4]
    broken.update(status="failed", error="CUDA out of memory (synthetic)")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), copy / "00000.parquet")
    png = preview.xy_grid(reader_of(copy), "guidance_scale", "seed")
    meta = check_grid(png, copy, "p000", "guidance_scale", "seed")
    grid = pixels(png)
    cells = {c["key"]: c for c in meta["cells"]}
    assert cells[broken["key"]]["status"] == "failed" and not cells[broken["key"]]["shown"]
    assert sum(c["shown"] for c in meta["cells"]) == 8
    region = crop(grid, cells[broken["key"]]["box"])
    assert (region == np.array(preview.PLACEHOLDER)).all(axis=-1).mean() > 0.8
    assert has_ink(region[:20]) and (region == preview.RED).all(axis=-1).any()  # "failed", in red
    # A prompt whose every row failed (an empty prompt) has nothing to plot, and says why.
    with pytest.raises(
        PreviewError,
        match=r"prompt_id 'p002' has no image to put in a grid: all 9 of its rows "
        r"failed \(prompt is empty or whitespace-only\)",
    ):
        preview.xy_grid(reader_of(dataset), "guidance_scale", "seed", prompt_id="p002")


@pytest.mark.slow
def test_bad_axes_are_named_with_the_columns_that_vary(dataset):
    reader = reader_of(dataset)
    with pytest.raises(
        ValueError,
        match=r"x axis 'width' does not vary for prompt_id 'p000' \(every row has "
        r"width=64\); columns that vary: guidance_scale, seed",
    ):
        preview.xy_grid(reader, "width", "seed")
    with pytest.raises(
        ValueError,
        match=r"y axis 'cfg' is not a column of .*; columns that vary for prompt_id "
        r"'p000': guidance_scale, seed",
    ):
        preview.xy_grid(reader, "guidance_scale", "cfg")
    with pytest.raises(ValueError, match=r"'key' is a result column, not a sweep axis"):
        preview.xy_grid(reader, "key", "seed")
    with pytest.raises(ValueError, match=r"x and y are both 'seed'"):
        preview.xy_grid(reader, "seed", "seed")
    with pytest.raises(
        ValueError, match=r"prompt_id 'nope' is not in .*first prompt ids: p000, p001, p002"
    ):
        preview.xy_grid(reader, "guidance_scale", "seed", prompt_id="nope")


# ------------------------------------------------------------------------------------ filtered images


@pytest.mark.slow
def test_filtered_images_are_shown_only_when_asked(quarantined):
    reader = reader_of(quarantined)
    held = rows_of(quarantined, "quarantine")
    assert len(held) == 18 and {r["status"] for r in held} == {"filtered"}
    # Every image was filtered, so the shard keeps none and writes no tar (#33: no empty tars).
    assert not (quarantined / "00000.tar").exists()

    hidden = preview.contact_sheet(reader, limit=16)
    assert preview.read_preview_meta(hidden)["tiles"] == []
    assert Image.open(io.BytesIO(hidden)).height < SIZE * SCALE  # a note, no tiles

    png = preview.contact_sheet(reader, limit=16, show_filtered=True)
    sheet, tiles = pixels(png), preview.read_preview_meta(png)["tiles"]
    assert len(tiles) == 16 and {t["status"] for t in tiles} == {"filtered"}
    for t in tiles:
        assert np.array_equal(
            crop(sheet, t["box"]), enlarged(tar_image(quarantined, t["key"], "quarantine"))
        )
        x0, y0, x1, _ = t["box"]
        assert (sheet[y0 - 2, x0:x1] == preview.RED).all()  # the red frame marks it

    png = preview.xy_grid(reader, "guidance_scale", "seed")
    grid, meta = pixels(png), preview.read_preview_meta(png)
    assert [c["status"] for c in meta["cells"]] == ["filtered"] * 9 and not any(
        c["shown"] for c in meta["cells"]
    )
    for c in meta["cells"]:  # labelled grey placeholders of the full cell size, no image pixels
        assert c["box"][2] - c["box"][0] == SIZE * SCALE
        region = crop(grid, c["box"])
        assert (region == np.array(preview.PLACEHOLDER)).all(axis=-1).mean() > 0.8 and has_ink(
            region
        )
    png = preview.xy_grid(reader, "guidance_scale", "seed", show_filtered=True)
    grid, meta = pixels(png), preview.read_preview_meta(png)
    assert all(c["shown"] for c in meta["cells"])
    for c in meta["cells"]:
        inner = crop(grid, c["box"])[4:-4, 4:-4]  # inside the red frame
        want = enlarged(tar_image(quarantined, c["key"], "quarantine"))[4:-4, 4:-4]
        assert (inner == want).all(axis=-1).mean() > 0.9  # all but the "FILTERED" label

    page = Path(preview.html_gallery(reader)).read_text()
    assert page.count('data-status="filtered"') == 18 and "<img" not in page
    page = Path(preview.html_gallery(reader, show_filtered=True)).read_text()
    assert page.count("<img ") == 18


# ------------------------------------------------------------------------------------ run_preview


@pytest.mark.slow
def test_run_preview_writes_where_it_says(dataset, tmp_path, capsys):
    out = str(dataset)
    assert preview.run_preview(out) == str(dataset / "preview" / "contact_sheet.png")
    assert (dataset / "preview" / "contact_sheet.png").exists()
    path = preview.run_preview(out, grid="x=guidance_scale,y=seed")
    assert path == str(dataset / "preview" / "xy_guidance_scale_seed.png")
    other = preview.run_preview(out, grid="x=seed,y=guidance_scale", prompt_id="p001")
    assert Path(other).name.startswith("xy_seed_guidance_scale_") and "p001" not in other
    assert preview.run_preview(
        out, out=str(tmp_path / "g.png"), grid="x=seed,y=guidance_scale"
    ) == str(tmp_path / "g.png")
    page = preview.run_preview(out, html=True, limit=5)
    assert page == str(dataset / "preview" / "index.html")
    printed = capsys.readouterr().out
    assert f"open: file://{dataset}/preview/index.html" in printed
    with pytest.raises(PreviewError, match="expected x=AXIS,y=AXIS"):
        preview.run_preview(out, grid="guidance_scale")
    with pytest.raises(PreviewError, match="one at a time"):
        preview.run_preview(out, grid="x=seed,y=guidance_scale", html=True)
    # As a command: errors exit 1 with the message, not a traceback.
    done = run_cli("preview", out, "--grid", "x=width,y=seed", timeout=120)
    assert done.returncode == 1 and "columns that vary: guidance_scale, seed" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_previews_read_and_write_s3(dataset, s3, tmp_path):
    from sdfleet.jobs.preview import gallery_link

    for f in sorted(dataset.iterdir()):
        if f.is_file():
            s3.put(str(f), f"{s3.bucket}/ds/{f.name}")
    reader = OutputReader.open(f"s3://{s3.bucket}/ds")
    written = preview.run_preview(reader.storage.uri)
    assert written == f"s3://{s3.bucket}/ds/preview/contact_sheet.png"
    assert (
        len(preview.read_preview_meta(s3.cat(f"{s3.bucket}/ds/preview/contact_sheet.png"))["tiles"])
        == 18
    )
    assert preview.html_gallery(reader) == f"s3://{s3.bucket}/ds/preview/index.html"
    url = gallery_link(reader)
    assert url.startswith("http") and ("Signature=" in url or "X-Amz-Signature=" in url)
    with urllib.request.urlopen(url, timeout=30) as resp:  # the presigned page needs nothing else
        page = resp.read().decode()
        # A browser shows it rather than downloading it (S3 would serve binary/octet-stream).
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.count("<img ") == 18 and "preview-test" in page
    assert s3.info(f"{s3.bucket}/ds/preview/contact_sheet.png")["ContentType"] == "image/png"


# ------------------------------------------------------------------------------------ the gallery in Chromium

BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1280,900",
]


def colourful(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, 3), axis=0))


@pytest.mark.slow
@needs_chromium
def test_gallery_shows_thumbnails_in_chromium_and_its_hash_opens_that_sample(dataset, tmp_path):
    page = Path(preview.html_gallery(reader_of(dataset)))
    shot = tmp_path / "gallery.png"
    base = [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run(
        [*base, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert shot.exists(), done.stderr[-2000:]
    img = pixels(shot)
    assert img.shape[:2] == (900, 1280)
    assert colourful(img) > 2000  # thumbnails of the noisy tiny-model images, not a blank page
    # The first card's thumbnail sits in the top-left of the grid: a colourful 160 px block there.
    assert colourful(img[130:280, 30:200]) > 1000
    # #KEY opens that sample's detail: the DOM after scripts ran holds its row, the seed exact.
    rows = rows_of(dataset)
    target = next(r for r in rows if r["status"] == "ok" and r["prompt_id"] == "p001")
    dom = subprocess.run(
        [*base, "--dump-dom", f"{page.as_uri()}#{target['key']}"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert f'<h2 id="detail-key">{target["key"]} (ok)</h2>' in dom
    assert f'<tr data-column="seed"><th>seed</th><td>{target["seed"]}</td></tr>' in dom
    assert '<div id="detail">' in dom  # no longer hidden


# The document has loaded and no image it asked for is still pending (loaded or broken both count).
SETTLED = (
    "return document.readyState === 'complete' && Array.from(document.images)"
    ".every(i => i.complete || i.loading === 'lazy')"
)


class WebDriver:
    """Just enough of the W3C WebDriver protocol, over HTTP to Debian's chromedriver (no selenium)."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, profile: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(self._ready, 30, "chromedriver to start", poll=0.2)
        except AssertionError:
            self.proc.kill()
            raise RuntimeError("chromedriver did not start") from None
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [*BROWSER_FLAGS, f"--user-data-dir={profile}"],
            },
        }
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})[
            "sessionId"
        ]

    def _ready(self) -> bool:
        try:
            return self._call("GET", "/status")["ready"]
        except OSError:  # not listening yet
            return False

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:  # WebDriver errors come as 4xx/5xx with a JSON body
            value = json.loads(e.read())["value"]
            raise RuntimeError(
                f"WebDriver {method} {path}: {value.get('error')}: "
                f"{str(value.get('message'))[:500]}"
            ) from None

    def __call__(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def click(self, css: str) -> None:
        self("POST", f"/element/{self.find(css)}/click", {})

    def js(self, script: str):
        return self("POST", "/execute/sync", {"script": script, "args": []})

    def wait_until_settled(self, timeout: float = 30) -> None:
        """Until the page has loaded and every image it asked for has loaded or failed. An image's
        error event fires in the same task that marks it complete, so once this holds, the onerror
        of any injected `<img src=x>` has run (lazy thumbnails are not asked for until in view)."""
        wait_for(lambda: self.js(SETTLED), timeout, "the page and its images to finish loading")

    def cdp(self, command: str, params: dict) -> None:
        """A Chrome DevTools command, through chromedriver's own endpoint."""
        self("POST", "/goog/cdp/execute", {"cmd": command, "params": params})

    def screenshot(self, path: Path) -> np.ndarray:
        path.write_bytes(base64.b64decode(self("GET", "/screenshot")))
        return pixels(path)

    def close(self) -> None:
        try:
            self("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.mark.slow
@needs_chromedriver
def test_gallery_click_shows_metadata_and_filters_by_status(dataset, tmp_path):
    page = Path(preview.html_gallery(reader_of(dataset)))
    rows = {r["key"]: r for r in rows_of(dataset)}
    driver = WebDriver(tmp_path / "profile")
    try:
        driver.get(page.as_uri())
        visible = (
            "return Array.from(document.querySelectorAll('#grid .card')).filter(c => c.offsetParent)"
            ".map(c => c.dataset.status)"
        )
        assert sorted(driver.js(visible)) == ["failed"] * 9 + ["ok"] * 18
        # The thumbnails in view are decoded images (64 px, as in the tar), not broken links.
        in_view = driver.js(
            "return Array.from(document.images).filter(i => i.getBoundingClientRect().bottom "
            "< innerHeight).map(i => [i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
        )
        assert len(in_view) >= 6 and all(v == [True, 64, 160] for v in in_view), in_view
        before = driver.screenshot(tmp_path / "grid.png")
        assert colourful(before) > 2000

        # A real click on the fifth card opens its metadata.
        key = driver.js("return document.querySelectorAll('#grid .card')[4].dataset.key")
        driver.click(f'#grid .card[data-key="{key}"]')
        assert driver.js("return document.getElementById('detail').hidden") is False
        table = driver.js(
            "return Object.fromEntries(Array.from(document.querySelectorAll('#meta tr'))"
            ".map(tr => [tr.dataset.column, tr.querySelector('td').textContent]))"
        )
        row = rows[key]
        assert table["key"] == key and table["status"] == "ok" and table["prompt"] == row["prompt"]
        assert table["seed"] == str(row["seed"])  # exact, though past 2**53
        assert float(table["guidance_scale"]) == row["guidance_scale"]
        assert table["safety_detector"] == "null" and table["nsfw_score"] == "null"
        assert driver.js("return location.hash") == f"#{key}"
        after = driver.screenshot(tmp_path / "detail.png")
        assert not np.array_equal(before, after)
        driver.click("#close")
        assert driver.js("return document.getElementById('detail').hidden") is True

        # Status filter: untick "ok" and only the failed rows stay, with their error shown.
        driver.click('#filters input[value="ok"]')
        assert sorted(driver.js(visible)) == ["failed"] * 9
        assert "prompt is" in driver.js(
            "return document.querySelector('.card.s-failed .ph').textContent"
        )
        driver.click('#filters input[value="ok"]')
        driver.click('#filters input[value="failed"]')
        assert sorted(driver.js(visible)) == ["ok"] * 18
    finally:
        driver.close()


@pytest.mark.slow
@needs_chromedriver
def test_gallery_sorts_by_a_curation_score_highest_first(tmp_path):
    scores = [12.5, None, 31.0, 3.25, 20.0]
    out = synthetic_output(
        tmp_path / "out",
        [{"clip_score": v, "status": "ok" if v is not None else "failed"} for v in scores],
    )
    page = Path(preview.html_gallery(reader_of(out)))
    assert (
        '<option value="clip_score">' in page.read_text()
        and 'value="aesthetic_score"' not in page.read_text()
    )
    keys = [f"{SYNTHETIC_SHARD}{i:04d}" for i in range(len(scores))]
    order = "return Array.from(document.querySelectorAll('#grid .card'), c => c.dataset.key)"
    driver = WebDriver(tmp_path / "profile")
    try:
        driver.get(page.as_uri())
        assert driver.js(order) == keys
        driver.js(
            "const s = document.getElementById('sort'); s.value = 'clip_score';"
            "s.dispatchEvent(new Event('input', {bubbles: true}))"
        )
        assert driver.js(order) == [
            keys[i] for i in (2, 4, 0, 3, 1)
        ]  # the row without a score last
        driver.js(
            "const s = document.getElementById('sort'); s.value = 'key';"
            "s.dispatchEvent(new Event('input', {bubbles: true}))"
        )
        assert driver.js(order) == keys
    finally:
        driver.close()


# ------------------------------------------------------------------------------------ hostile values

# Every string column a Parquet row may carry; "caption" stands for a passthrough column of the input.
HOSTILE_COLUMNS = (
    "status",
    "key",
    "prompt",
    "negative_prompt",
    "error",
    "scheduler",
    "model_source",
    "prompt_id",
    "caption",
)


def hostile(tag: str) -> str:
    """Markup that, were it ever live, records `tag` in window.__pwned: an image that fails to load,
    and a script. A stray entity and comment opener ride along: they must show as typed too."""
    return (
        f"\"><img src=x onerror=\"window.__pwned.push('{tag}')\"><script>window.__pwned.push('{tag}')</script>"
        " &amp; <!--"
    )


def hostile_output(root: Path) -> tuple[Path, list[dict]]:
    """An output whose every string column (and the job's name and model) holds markup.

    Three rows: an ok row with an image; a row whose key is hostile; a row whose status is hostile.
    sdfleet makes keys from the shard id and offset (digits), which also name the tar members; a
    hostile key can only come from a tampered Parquet, so that row failed and has no image to pair
    with it (the tar is never asked for it). A hostile status is not `ok`: no image either.
    """
    common = {c: hostile(c) for c in HOSTILE_COLUMNS if c not in ("status", "key")}
    samples = [
        {**common, "status": "ok"},
        {**common, "key": hostile("key"), "status": "failed"},
        {**common, "status": hostile("status")},
    ]
    spec = {
        "name": hostile("spec.name"),
        "model": {"source": hostile("spec.model.source")},
        "sweep": {"seeds": 1, "axes": {}},
    }
    out = synthetic_output(root, samples, spec)
    return out, rows_of(out)


class TagCollector(html.parser.HTMLParser):
    """Every element of a page as the browser's parser would build it, with its attributes unescaped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_gallery_html_carries_hostile_values_as_text_only(tmp_path):
    out, rows = hostile_output(tmp_path / "out")
    page = Path(preview.html_gallery(reader_of(out))).read_text()
    assert "<img src=x" not in page and "<script>window.__pwned" not in page and "<!--" not in page
    parser = TagCollector()
    parser.feed(page)
    tags = [t for t, _ in parser.tags]
    assert (
        tags.count("img") == 1 and tags.count("script") == 2
    )  # the thumbnail; the rows and the page's code
    cards = [attrs for t, attrs in parser.tags if t == "figure"]
    by_key = {c["data-key"]: c for c in cards}
    assert set(by_key) == {r["key"] for r in rows}
    assert by_key[hostile("key")]["data-status"] == "failed"
    hostile_status = next(c for c in cards if c["data-status"] == hostile("status"))
    assert (
        hostile_status["class"] == f"card s-{hostile('status')}"
    )  # one attribute value, not markup
    blob = page.split('<script id="rows" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(blob) == rows


@pytest.mark.slow
@needs_chromedriver
def test_gallery_runs_no_hostile_markup_in_chromium_and_shows_it_verbatim(tmp_path):
    out, rows = hostile_output(tmp_path / "out")
    page = Path(preview.html_gallery(reader_of(out)))
    driver = WebDriver(tmp_path / "profile")
    pwned = "return window.__pwned"
    try:
        # The hook is in place before any script of the page runs, so an injected one would record itself.
        driver.cdp("Page.addScriptToEvaluateOnNewDocument", {"source": "window.__pwned = [];"})
        driver.get(page.as_uri())
        # An injected <img src=x> fails to load and fires onerror asynchronously: wait for that.
        driver.wait_until_settled()
        assert driver.js(pwned) == []
        assert driver.js("return document.querySelectorAll('img').length") == 1
        assert driver.js("return document.querySelectorAll('script').length") == 2
        assert driver.js("return document.title") == f"{hostile('spec.name')}: preview"
        assert driver.js("return document.querySelector('h1').textContent") == hostile("spec.name")

        cards = driver.js("""return Array.from(document.querySelectorAll('#grid .card'), c => ({
            key: c.querySelector('.key').textContent, status: c.querySelector('.badge').textContent,
            prompt: c.querySelector('.prompt').textContent, dataKey: c.dataset.key,
            placeholder: c.querySelector('.ph') && c.querySelector('.ph span').textContent}))""")
        assert [c["key"] for c in cards] == [r["key"] for r in rows]
        assert [c["dataKey"] for c in cards] == [r["key"] for r in rows]
        assert [c["status"] for c in cards] == [r["status"] for r in rows]
        assert all(c["prompt"] == hostile("prompt") for c in cards)
        failed = next(c for c in cards if c["status"] == "failed")
        assert failed["key"] == hostile("key") and failed["placeholder"] == hostile("error")

        # A real click on each card opens its row: every value, verbatim, as text; still nothing ran.
        for n, row in enumerate(rows, start=1):
            driver.click(f"#grid .card:nth-of-type({n})")
            assert driver.js("return document.getElementById('detail').hidden") is False
            assert (
                driver.js("return document.getElementById('detail-key').textContent")
                == f"{row['key']} ({row['status']})"
            )
            table = driver.js(
                "return Object.fromEntries(Array.from(document.querySelectorAll('#meta tr'))"
                ".map(tr => [tr.dataset.column, tr.querySelector('td').textContent]))"
            )
            for column in HOSTILE_COLUMNS:
                assert table[column] == row[column], column
            driver.wait_until_settled()
            assert driver.js(pwned) == []
            driver.click("#close")

        # #KEY with the hostile key opens that row too (a fresh load, so the hook runs again).
        driver.get("about:blank")
        driver.get(f"{page.as_uri()}#{urllib.parse.quote(hostile('key'), safe='')}")
        driver.wait_until_settled()
        assert (
            driver.js("return document.getElementById('detail-key').textContent")
            == f"{hostile('key')} (failed)"
        )
        driver.wait_until_settled()
        assert driver.js(pwned) == []

        # The hook does catch live markup: the same string put in as HTML records itself.
        driver.js(
            f"document.getElementById('grid').insertAdjacentHTML('beforeend', {json.dumps(hostile('control'))})"
        )
        wait_for(lambda: driver.js(pwned), 10, "the live control markup to record itself")
        assert driver.js(pwned) == ["control"]
    finally:
        driver.close()


def test_xy_grid_on_a_t5_familys_swept_keys(tmp_path):
    """A FLUX.1 sweep of T5 length x true CFG: either key is a grid axis, and the family's columns
    that follow it (T5's truncation at each length) are results, never held (holding one would
    empty the other lengths' cells)."""
    samples = [
        {
            "max_sequence_length": length,
            "true_cfg_scale": scale,
            "seed": seed,
            "prompt_tokens_2": 100,
            "prompt_truncated_2": length < 100,
            "scheduler_mu": 0.6,
        }
        for length in (77, 256)
        for scale in (1.0, 4.0)
        for seed in (1, 2)
    ]
    out = synthetic_output(tmp_path / "out", samples)
    meta = preview.read_preview_meta(preview.xy_grid(reader_of(out), "max_sequence_length", "seed"))
    assert meta["x_values"] == [77, 256] and meta["y_values"] == [1, 2]
    assert meta["held"] == {"true_cfg_scale": 1.0}
    assert len({c["key"] for c in meta["cells"]}) == 4
    meta = preview.read_preview_meta(
        preview.xy_grid(reader_of(out), "true_cfg_scale", "max_sequence_length")
    )
    assert meta["x_values"] == [1.0, 4.0] and meta["held"] == {"seed": 1}
    assert len(meta["cells"]) == 4
    with pytest.raises(PreviewError, match="prompt_truncated_2' is a result column"):
        preview.xy_grid(reader_of(out), "prompt_truncated_2", "seed")
