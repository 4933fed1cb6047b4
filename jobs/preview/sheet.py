"""The contact sheet: a deterministic sample of images in key order, each with its key and prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from sdfleet.jobs.output import OutputReader
from sdfleet.jobs.preview.draw import (
    BACKGROUND,
    INK,
    MUTED,
    ORANGE,
    PLACEHOLDER,
    RED,
    decode,
    nsfw_label,
    scale_factor,
    scale_image,
)
from sdfleet.jobs.preview.files import encode_png, png_or_written
from sdfleet.jobs.preview.text import Font, fmt_value, font, line_height, text_width, truncate, wrap
from sdfleet.schemas.rows import STATUS_FILTERED

MARGIN = 12  # around the sheet, and between tiles
CAPTION_GAP = 6  # between an image and its caption
TITLE_GAP = 10  # under the title
# Sweep columns in a tile's caption, short: a 160 px tile holds about 25 characters.
SHORT_NAMES = {"guidance_scale": "cfg", "num_inference_steps": "steps", "negative_prompt": "neg"}


@dataclass
class _Tile:
    row: dict[str, Any]
    image: Image.Image | None = None  # None: the image is missing from its tar


@dataclass
class _Arrangement:
    """Where the tiles go: `cols` per row, each `tile_w` wide, its image `img_h` high, under a title."""

    count: int
    cols: int
    tile_w: int
    img_h: int
    cell_h: int
    title_h: int

    @property
    def rows(self) -> int:
        return math.ceil(self.count / self.cols)

    def origin(self, index: int) -> tuple[int, int]:
        r, c = divmod(index, self.cols)
        return MARGIN + c * (self.tile_w + MARGIN), self.title_h + MARGIN + r * (
            self.cell_h + MARGIN
        )


def select_sample(
    reader: OutputReader, limit: int, show_filtered: bool = False
) -> list[dict[str, Any]]:
    """A deterministic sample of rows that have an image, in key order: first the first image of each
    prompt (so the sheet shows as many prompts as it can), then the following images in key order.

    Shards are read in order and reading stops once `limit` prompts are found (or after a row budget,
    or a shard budget for datasets of many small shards), so a sheet of a large dataset reads its
    first Parquet files only.
    """
    if limit <= 0:
        return []
    candidates: list[dict[str, Any]] = []
    prompts: set[Any] = set()
    budget = max(20 * limit, 10_000)
    for shard in reader.shards[: max(4 * limit, 64)]:
        for row in reader.rows(shard):
            if reader.has_image(row, show_filtered):
                candidates.append(row)
                prompts.add(row.get("prompt_id"))
        if len(prompts) >= limit or len(candidates) >= budget:
            break
    chosen: dict[str, dict[str, Any]] = {}
    seen: set[Any] = set()
    for row in candidates:
        if len(chosen) < limit and row.get("prompt_id") not in seen:
            seen.add(row.get("prompt_id"))
            chosen[row["key"]] = row
    for row in candidates:
        if len(chosen) >= limit:
            break
        chosen.setdefault(row["key"], row)
    return sorted(chosen.values(), key=lambda r: r["key"])


def contact_sheet(
    reader: OutputReader,
    out_path: str | None = None,
    limit: int = 64,
    show_filtered: bool = False,
    *,
    min_tile: int = 160,
    max_tile: int = 256,
    title: bool = True,
    caption_lines: int = 2,
    font_size: int = 12,
) -> bytes | str:
    """A PNG contact sheet of up to `limit` images (see `select_sample` for which), tiles in key order,
    left to right, each with its key and the start of its prompt underneath.

    Images are scaled by one factor per tile (`scale_factor(max(w, h), min_tile, max_tile)`): tiny
    images are enlarged by an integer factor so the text under them stays readable. Filtered images
    (only with show_filtered, from quarantine/) get a red frame and "FILTERED"; images that are ok but
    were flagged (safety.action score or blackout) an orange one.
    Returns the PNG's bytes, or the path/URI written when `out_path` is given.
    """
    tiles = _load_tiles(reader, select_sample(reader, limit, show_filtered), min_tile, max_tile)
    small, large = font(font_size), font(font_size + 4)
    point_columns = [*reader.job["spec"]["sweep"]["axes"], "seed"]
    caption_h = line_height(small) * (2 + caption_lines)  # key, sweep point, prompt
    title_h = line_height(large) + TITLE_GAP if title else 0
    layout = _arrange(tiles, min_tile, caption_h, title_h)
    heading = _heading(reader, len(tiles), show_filtered)
    empty_note = "no images to show" + (
        ""
        if show_filtered
        else " (filtered images are hidden; --show-filtered shows quarantined ones)"
    )
    if tiles:
        width = 2 * MARGIN + layout.cols * layout.tile_w + (layout.cols - 1) * MARGIN
        width = max(width, math.ceil(text_width(large, heading)) + 2 * MARGIN if title else 0)
        height = title_h + 2 * MARGIN + layout.rows * layout.cell_h + (layout.rows - 1) * MARGIN
    else:
        width = (
            math.ceil(
                max(text_width(large, heading) if title else 0, text_width(small, empty_note))
            )
            + 2 * MARGIN
        )
        height = title_h + 2 * MARGIN + line_height(small) * 2

    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text(
            (MARGIN, MARGIN), truncate(heading, large, width - 2 * MARGIN), font=large, fill=INK
        )
    if not tiles:
        draw.text((MARGIN, title_h + MARGIN), empty_note, font=small, fill=MUTED)
    meta_tiles = [
        _draw_tile(sheet, draw, tile, layout.origin(i), layout, small, caption_lines, point_columns)
        for i, tile in enumerate(tiles)
    ]
    png = encode_png(
        sheet, {"kind": "contact_sheet", "show_filtered": show_filtered, "tiles": meta_tiles}
    )
    return png_or_written(reader.storage, png, out_path)


def small_contact_sheet(reader: OutputReader, limit: int = 16) -> bytes:
    """A small PNG sheet (tiles of 96-128 px, one caption line, no title) for the dataset card.
    Never shows filtered images."""
    return contact_sheet(
        reader,
        None,
        limit=limit,
        show_filtered=False,
        min_tile=96,
        max_tile=128,
        title=False,
        caption_lines=1,
        font_size=11,
    )


def _load_tiles(
    reader: OutputReader, rows: list[dict[str, Any]], min_tile: int, max_tile: int
) -> list[_Tile]:
    images = reader.images(rows)
    tiles = []
    for r in rows:
        if r["key"] not in images:
            tiles.append(_Tile(r))
            continue
        factor = scale_factor(max(r["width"] or 1, r["height"] or 1), min_tile, max_tile)
        tiles.append(_Tile(r, scale_image(decode(images[r["key"]][1]), factor)))
    return tiles


def _arrange(tiles: list[_Tile], min_tile: int, caption_h: int, title_h: int) -> _Arrangement:
    """A square-ish grid of equal cells, each as large as the largest image (at least `min_tile`)."""
    tile_w = max([min_tile] + [t.image.width for t in tiles if t.image])
    img_h = max([min_tile] + [t.image.height for t in tiles if t.image]) if tiles else 0
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    return _Arrangement(
        count=len(tiles),
        cols=cols,
        tile_w=tile_w,
        img_h=img_h,
        cell_h=img_h + CAPTION_GAP + caption_h,
        title_h=title_h,
    )


def _heading(reader: OutputReader, shown: int, show_filtered: bool) -> str:
    totals = reader.survey().totals()
    heading = (
        f"{reader.name}: {shown} shown · {totals.ok} ok, {totals.filtered} filtered, "
        f"{totals.failed} failed"
    )
    return heading + (" · filtered shown" if show_filtered else "")


def _draw_tile(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    tile: _Tile,
    origin: tuple[int, int],
    layout: _Arrangement,
    f: Font,
    caption_lines: int,
    point_columns: list[str],
) -> dict[str, Any]:
    """One tile: the image centred in its cell (or a placeholder), a frame if it is marked, the
    caption under it. Returns the tile's entry for the PNG's layout metadata."""
    x0, y0 = origin
    row = tile.row
    if tile.image is not None:
        ix, iy = (
            x0 + (layout.tile_w - tile.image.width) // 2,
            y0 + (layout.img_h - tile.image.height) // 2,
        )
        sheet.paste(tile.image, (ix, iy))
        box = [ix, iy, ix + tile.image.width, iy + tile.image.height]
    else:
        box = [x0, y0, x0 + layout.tile_w, y0 + layout.img_h]
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=PLACEHOLDER)
        draw.text((x0 + 6, y0 + 6), "image missing", font=f, fill=MUTED)
    label, colour = row["key"], INK
    if row["status"] == STATUS_FILTERED:
        label, colour = f"{row['key']} FILTERED{nsfw_label(row)}", RED
    elif row.get("safety_flagged"):
        label, colour = f"{row['key']} flagged{nsfw_label(row)}", ORANGE
    if colour != INK:
        draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 2, box[3] + 2], outline=colour, width=3)
    lh = line_height(f)
    ty = y0 + layout.img_h + CAPTION_GAP
    draw.text((x0, ty), truncate(label, f, layout.tile_w), font=f, fill=colour)
    point = " ".join(f"{SHORT_NAMES.get(c, c)}={fmt_value(row.get(c), 19)}" for c in point_columns)
    draw.text((x0, ty + lh), truncate(point, f, layout.tile_w), font=f, fill=MUTED)
    for j, line in enumerate(wrap(row.get("prompt") or "", f, layout.tile_w, caption_lines)):
        draw.text((x0, ty + lh * (2 + j)), line, font=f, fill=MUTED)
    return {"key": row["key"], "status": row["status"], "box": box, "shown": tile.image is not None}
