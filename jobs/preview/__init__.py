"""Look at an output: a contact sheet, an X/Y grid of one prompt, and a static HTML gallery.

Everything is read from what the output already holds (`NNNNN.parquet`, `NNNNN.tar`, `quarantine/`,
`_job.json`) through `actors.storage.Storage`, so a local folder and an `s3://` prefix work alike.
Only Pillow and pyarrow are needed: no torch, no Ray.

- `contact_sheet(storage, out_path=None, limit=64)`: PNG of a deterministic sample of images, each
  tile with its key and the start of its prompt.
- `small_contact_sheet(storage, limit=16)`: the same, smaller, as bytes (for the dataset card).
- `xy_grid(storage, x, y, prompt_id=None)`: one prompt across two varying columns, like the X/Y plot
  of the Stable Diffusion web UIs.
- `html_gallery(storage)`: one self-contained `preview/index.html` written into the output.
- `run_preview(...)`: what `sdfleet preview` does; `add_preview_arguments` and `main` for the CLI.

Images are read by streaming the tars (`tarfile` mode `r|`) and stopping as soon as every wanted key
has been seen (keys are in order inside a tar), so a preview of the first samples reads the start of
the first tars only. Filtered images are never shown unless `show_filtered=True`; they then come
from `quarantine/NNNNN.tar` (safety.action=quarantine; `drop` keeps no image) and are marked.

Every PNG written here carries a `sdfleet-preview` text chunk: JSON with the kind of preview and,
per tile or cell, its key, status and pixel box, so tools (and the tests) can map pixels to samples.
File names come from keys, axis names and a hash of the prompt id, never from prompt text.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import functools
import hashlib
from html import escape as _esc
import io
import json
import logging
import math
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from actors.storage import Storage, is_remote
from schemas.rows import STATUS_FAILED, STATUS_FILTERED, STATUS_OK

log = logging.getLogger("sdfleet")

STATUSES = (STATUS_OK, STATUS_FILTERED, STATUS_FAILED)
IMAGE_EXTS = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
SHARD_RE = re.compile(r"\d{5,}")
# The columns a sweep can vary, in the order they are offered when an axis is wrong.
AXIS_COLUMNS = ("guidance_scale", "num_inference_steps", "seed", "scheduler", "width", "height", "negative_prompt")
# Columns that differ per sample by construction (or describe the result, not the input): never an axis.
NOT_AXES = frozenset({
    "key", "sample_id", "shard_id", "status", "error", "image_sha256", "nsfw_score", "nsfw_scores",
    "safety_flagged", "prompt", "prompt_id", "prompt_tokens", "prompt_truncated", "device", "worker_node",
    "worker_id", "gpu_id", "gen_seconds", "created_at",
})
PREVIEW_DIR = "preview"
META_KEY = "sdfleet-preview"

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
RED = (200, 30, 30)
ORANGE = (225, 130, 0)
PLACEHOLDER = (228, 228, 228)


class PreviewError(ValueError):
    """A preview that cannot be made as asked (bad axis, unknown prompt id, not an sdfleet output)."""


# ------------------------------------------------------------------------------------ reading


class OutputReader:
    """Rows and images of one output, read lazily shard by shard and cached."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.shards = [n[: -len(".parquet")] for n in storage.list("*.parquet")
                       if SHARD_RE.fullmatch(n[: -len(".parquet")])]
        if not self.shards:
            raise PreviewError(f"{storage.url()} holds no NNNNN.parquet: not an sdfleet output, or no shard "
                               "has been written yet")
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._quarantined: set[str] | None = None
        self._job: dict[str, Any] | None = None

    @property
    def job(self) -> dict[str, Any]:
        if self._job is None:
            try:
                self._job = self.storage.read_json("_job.json")
            except FileNotFoundError:
                self._job = {}
        return self._job

    def rows(self, shard: str) -> list[dict[str, Any]]:
        if shard not in self._rows:
            table = pq.read_table(io.BytesIO(self.storage.read_bytes(f"{shard}.parquet")))
            rows = sorted(table.to_pylist(), key=lambda r: r["key"])
            for r in rows:
                r["_shard"] = shard
            self._rows[shard] = rows
        return self._rows[shard]

    def iter_rows(self) -> Iterable[dict[str, Any]]:
        for shard in self.shards:
            yield from self.rows(shard)

    @property
    def quarantined_keys(self) -> set[str]:
        """Keys whose image is held in quarantine/ (safety.action=quarantine)."""
        if self._quarantined is None:
            keys: set[str] = set()
            for name in self.storage.list("quarantine/*.parquet"):
                table = pq.read_table(io.BytesIO(self.storage.read_bytes(name)), columns=["key"])
                keys.update(table.column("key").to_pylist())
            self._quarantined = keys
        return self._quarantined

    def has_image(self, row: dict[str, Any], show_filtered: bool) -> bool:
        if row["status"] == STATUS_OK:
            return True
        return show_filtered and row["status"] == STATUS_FILTERED and row["key"] in self.quarantined_keys

    def images(self, rows: Iterable[dict[str, Any]]) -> dict[str, tuple[str, bytes]]:
        """{key: (extension, encoded bytes)} for rows that have an image, from the main or quarantine tar."""
        by_tar: dict[str, set[str]] = {}
        for r in rows:
            folder = "quarantine/" if r["status"] == STATUS_FILTERED else ""
            by_tar.setdefault(f"{folder}{r['_shard']}.tar", set()).add(r["key"])
        found: dict[str, tuple[str, bytes]] = {}
        for name, keys in sorted(by_tar.items()):
            found.update(self._read_tar(name, keys))
        return found

    def _read_tar(self, name: str, keys: set[str]) -> dict[str, tuple[str, bytes]]:
        found: dict[str, tuple[str, bytes]] = {}
        last = max(keys)
        # Remote: modest read-ahead blocks, so stopping early really does read only the start.
        options = {} if self.storage.local else {"block_size": 4 << 20, "cache_type": "readahead"}
        try:
            with self.storage.fs.open(self.storage.path(name), "rb", **options) as f, \
                    tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    stem, _, ext = member.name.rpartition(".")
                    if ext in IMAGE_EXTS and stem in keys:
                        found[stem] = (ext, tar.extractfile(member).read())
                        if len(found) == len(keys):
                            break
                    if len(stem) == len(last) and stem > last:
                        break  # members are in key order: the rest are past what we want
        except FileNotFoundError:
            log.warning("preview: %s is missing; its images are drawn as placeholders", self.storage.url(name))
        except tarfile.TarError as e:
            log.warning("preview: %s is unreadable (%s); its images are drawn as placeholders",
                        self.storage.url(name), e)
        return found

    def counts(self) -> dict[str, int] | None:
        results = self.job.get("results") or {}
        if all(k in results for k in STATUSES):
            return {k: int(results[k]) for k in STATUSES}
        return None

    @property
    def name(self) -> str:
        return str((self.job.get("spec") or {}).get("name") or self.storage.url().rstrip("/").rsplit("/", 1)[-1])


def decode(encoded: bytes) -> Image.Image:
    with Image.open(io.BytesIO(encoded)) as im:
        return im.convert("RGB")


# ------------------------------------------------------------------------------------ scaling


def scale_factor(max_side: int, min_px: int, max_px: int) -> float:
    """The factor every tile of a preview is scaled by: an integer for images smaller than `min_px`
    (nearest neighbour, so tiny images stay crisp and exact), `max_px / side` for larger ones, else 1."""
    if max_side < min_px:
        return float(math.ceil(min_px / max_side))
    if max_side > max_px:
        return max_px / max_side
    return 1.0


def scale_image(image: Image.Image, factor: float) -> Image.Image:
    """Resize as the previews do: nearest neighbour for integer upscales, Lanczos otherwise."""
    if factor == 1.0:
        return image
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    integer_up = factor > 1 and float(factor).is_integer()
    return image.resize(size, Image.Resampling.NEAREST if integer_up else Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------ text


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it (it covers accented Latin, Greek, Cyrillic), else Pillow's
    own scalable default font (Pillow >= 10.1 with FreeType), else its bitmap font."""
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_width(f, text: str) -> float:
    return f.getlength(text) if hasattr(f, "getlength") else f.getbbox(text)[2]


def line_height(f) -> int:
    top, bottom = f.getbbox("Ág")[1], f.getbbox("Ág")[3]
    return int(bottom - top) + 4 if bottom > top else 14


def clean(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def truncate(text: str, f, width: float) -> str:
    if _text_width(f, text) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if _text_width(f, text[:mid].rstrip() + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def wrap(text: str, f, width: float, max_lines: int, hard: bool = False) -> list[str]:
    """Word-wrap to `width` pixels; the last line is truncated with an ellipsis if text is left over.
    hard=True also breaks words wider than a line (a 19-digit seed in a narrow header)."""
    words, lines, current = clean(text).split(" "), [], ""
    if hard:
        words = [piece for word in words for piece in _split_word(word, f, width)]
    for i, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if _text_width(f, candidate) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
        if len(lines) == max_lines - 1:
            current = " ".join(words[i:])
            break
    if current or not lines:
        lines.append(current)
    return [truncate(line, f, width) for line in lines[:max_lines]]


def _split_word(word: str, f, width: float) -> list[str]:
    pieces = []
    while word and _text_width(f, word) > width:
        n = max(1, max(i for i in range(1, len(word) + 1) if i == 1 or _text_width(f, word[:i]) <= width))
        pieces.append(word[:n])
        word = word[n:]
    return pieces + ([word] if word else [])


def fmt_value(value: Any, limit: int = 40) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        value = clean(value)
        return '""' if value == "" else (value if len(value) <= limit else value[: limit - 1] + "…")
    return str(value)


# ------------------------------------------------------------------------------------ output


def _png(image: Image.Image, meta: dict[str, Any]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(META_KEY, json.dumps(meta, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, optimize=False, compress_level=6)
    return buf.getvalue()


def read_preview_meta(png: bytes) -> dict[str, Any]:
    """The layout JSON a preview PNG carries (tiles or cells with their keys and pixel boxes)."""
    with Image.open(io.BytesIO(png)) as im:
        return json.loads(im.text[META_KEY])


def write_output(storage: Storage, target: str, data: bytes) -> str:
    """Write `data` to `target` (a path or URI); inside the output it goes through `storage` itself,
    keeping its storage options. Returns the target as written (a local path or a URI)."""
    base = storage.url().rstrip("/") + "/"
    if target.startswith(base):
        storage.write_bytes(target[len(base):], data)
        return target
    if is_remote(target):
        parent, _, name = target.rstrip("/").rpartition("/")
        Storage(parent).write_bytes(name, data)
        return target
    path = Path(target.removeprefix("file://")).absolute()
    Storage(str(path.parent)).write_bytes(path.name, data)
    return str(path)


def _finish(storage: Storage, png: bytes, out_path: str | None) -> bytes | str:
    return png if out_path is None else write_output(storage, out_path, png)


# ------------------------------------------------------------------------------------ contact sheet


@dataclass
class _Tile:
    row: dict[str, Any]
    image: Image.Image | None = None


def select_sample(reader: OutputReader, limit: int, show_filtered: bool = False) -> list[dict[str, Any]]:
    """A deterministic sample of rows that have an image, in key order: first the first image of each
    prompt (so the sheet shows as many prompts as it can), then the following images in key order.

    Shards are read in order and reading stops once `limit` prompts are found (or after a row budget),
    so a sheet of a large dataset reads its first Parquet files only.
    """
    if limit <= 0:
        return []
    candidates: list[dict[str, Any]] = []
    prompts: set[Any] = set()
    budget = max(20 * limit, 10_000)
    for shard in reader.shards:
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


def contact_sheet(storage: Storage, out_path: str | None = None, limit: int = 64, show_filtered: bool = False, *,
                  min_tile: int = 160, max_tile: int = 256, title: bool = True, caption_lines: int = 2,
                  font_size: int = 12) -> bytes | str:
    """A PNG contact sheet of up to `limit` images (see `select_sample` for which), tiles in key order,
    left to right, each with its key and the start of its prompt underneath.

    Images are scaled by one factor per tile (`scale_factor(max(w, h), min_tile, max_tile)`): tiny
    images are enlarged by an integer factor so the text under them stays readable. Filtered images
    (only with show_filtered, from quarantine/) get a red frame and "FILTERED"; images that are ok but
    were flagged (safety.action score or blackout) an orange one.
    Returns the PNG's bytes, or the path/URI written when `out_path` is given.
    """
    reader = OutputReader(storage)
    rows = select_sample(reader, limit, show_filtered)
    images = reader.images(rows)
    tiles = [_Tile(r, scale_image(decode(images[r["key"]][1]),
                                  scale_factor(max(r["width"] or 1, r["height"] or 1), min_tile, max_tile)))
             if r["key"] in images else _Tile(r) for r in rows]
    f_small, f_title = font(font_size), font(font_size + 4)
    lh = line_height(f_small)
    margin, gap = 12, 12
    tile_w = max([min_tile] + [t.image.width for t in tiles if t.image])
    img_h = max([min_tile] + [t.image.height for t in tiles if t.image]) if tiles else 0
    cell_h = img_h + 6 + lh * (1 + caption_lines)
    cols = max(1, math.ceil(math.sqrt(len(tiles)))) if tiles else 1
    nrows = math.ceil(len(tiles) / cols) if tiles else 0
    counts = reader.counts()
    heading = f"{reader.name}: {len(tiles)} shown"
    if counts:
        heading += f" · {counts['ok']} ok, {counts['filtered']} filtered, {counts['failed']} failed"
    if show_filtered:
        heading += " · filtered shown"
    empty_note = "no images to show" + ("" if show_filtered else " (filtered images are hidden; show_filtered "
                                                                 "shows quarantined ones)")
    title_h = (line_height(f_title) + 10) if title else 0
    width = 2 * margin + cols * tile_w + (cols - 1) * gap
    if not tiles:
        width = math.ceil(max(_text_width(f_title, heading) if title else 0, _text_width(f_small, empty_note))) \
            + 2 * margin
    height = title_h + 2 * margin + (nrows * cell_h + (nrows - 1) * gap if nrows else lh * 2)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((margin, margin), truncate(heading, f_title, width - 2 * margin), font=f_title, fill=INK)
    if not tiles:
        draw.text((margin, title_h + margin), empty_note, font=f_small, fill=MUTED)
    meta_tiles = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = margin + c * (tile_w + gap), title_h + margin + r * (cell_h + gap)
        row = tile.row
        if tile.image is not None:
            ix, iy = x0 + (tile_w - tile.image.width) // 2, y0 + (img_h - tile.image.height) // 2
            sheet.paste(tile.image, (ix, iy))
            box = [ix, iy, ix + tile.image.width, iy + tile.image.height]
        else:
            box = [x0, y0, x0 + tile_w, y0 + img_h]
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=PLACEHOLDER)
            draw.text((x0 + 6, y0 + 6), "image missing", font=f_small, fill=MUTED)
        label, colour = row["key"], INK
        if row["status"] == STATUS_FILTERED:
            label, colour = f"{row['key']} FILTERED{_score(row)}", RED
        elif row.get("safety_flagged"):
            label, colour = f"{row['key']} flagged{_score(row)}", ORANGE
        if colour != INK:
            draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 2, box[3] + 2], outline=colour, width=3)
        ty = y0 + img_h + 6
        draw.text((x0, ty), truncate(label, f_small, tile_w), font=f_small, fill=colour)
        for j, line in enumerate(wrap(row.get("prompt") or "", f_small, tile_w, caption_lines)):
            draw.text((x0, ty + lh * (1 + j)), line, font=f_small, fill=MUTED)
        meta_tiles.append({"key": row["key"], "status": row["status"], "box": box, "shown": tile.image is not None})
    png = _png(sheet, {"kind": "contact_sheet", "show_filtered": show_filtered, "tiles": meta_tiles})
    return _finish(storage, png, out_path)


def _score(row: dict[str, Any]) -> str:
    score = row.get("nsfw_score")
    return f" nsfw {score:.2f}" if isinstance(score, (int, float)) and not math.isnan(score) else ""


def small_contact_sheet(storage: Storage, limit: int = 16) -> bytes:
    """A small PNG sheet (tiles of 96-128 px, one caption line, no title) for the dataset card.
    Never shows filtered images."""
    return contact_sheet(storage, None, limit=limit, show_filtered=False, min_tile=96, max_tile=128,
                         title=False, caption_lines=1, font_size=11)


# ------------------------------------------------------------------------------------ X/Y grid


def _prompt_rows(reader: OutputReader, prompt_id: str | None) -> tuple[str, list[dict[str, Any]]]:
    """All rows of one prompt (the first prompt of the dataset by default). A prompt's samples are
    contiguous in key order, so the scan stops at the first shard after them that has none (rows of
    a repeated prompt id further on are failed duplicates; `_best` prefers a usable row per cell)."""
    if prompt_id is None:  # the first prompt whose rows did not all fail (an empty prompt's rows do)
        for row in reader.iter_rows():
            if prompt_id is None:
                prompt_id = row.get("prompt_id")
            if row["status"] != STATUS_FAILED:
                prompt_id = row.get("prompt_id")
                break
    found: list[dict[str, Any]] = []
    seen_ids: list[str] = []
    for shard in reader.shards:
        here = [r for r in reader.rows(shard) if r.get("prompt_id") == prompt_id]
        if not here and found:
            break
        found.extend(here)
        if not found and len(seen_ids) < 5:
            seen_ids.extend(i for i in dict.fromkeys(r.get("prompt_id") for r in reader.rows(shard))
                            if i not in seen_ids)
    if not found:
        raise PreviewError(f"prompt_id {prompt_id!r} is not in {reader.storage.url()} (its first prompt ids: "
                           f"{', '.join(map(str, seen_ids[:5]))})")
    return str(prompt_id), found


def _distinct(rows: list[dict[str, Any]], column: str) -> list[Any]:
    return list(dict.fromkeys(_hashable(r.get(column)) for r in rows))


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def varying_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns that take more than one value among `rows`: the sweep axes first, then any other."""
    names = [c for c in AXIS_COLUMNS if rows and c in rows[0]]
    names += [c for c in (rows[0] if rows else {}) if c not in AXIS_COLUMNS and c not in NOT_AXES
              and not c.startswith("_")]
    return [c for c in names if len(_distinct(rows, c)) > 1]


def _check_axis(axis: str, which: str, rows: list[dict[str, Any]], prompt_id: str, url: str) -> None:
    varying = varying_columns(rows)
    vary_text = ", ".join(varying) if varying else "none"
    if axis not in rows[0] or axis.startswith("_"):
        raise PreviewError(f"{which} axis {axis!r} is not a column of {url}; columns that vary for prompt_id "
                           f"{prompt_id!r}: {vary_text}")
    if axis in NOT_AXES:
        raise PreviewError(f"{which} axis {axis!r} is a result column, not a sweep axis; columns that vary for "
                           f"prompt_id {prompt_id!r}: {vary_text}")
    if axis not in varying:
        raise PreviewError(f"{which} axis {axis!r} does not vary for prompt_id {prompt_id!r} (every row has "
                           f"{axis}={fmt_value(rows[0].get(axis))}); columns that vary: {vary_text}")


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    order = {STATUS_OK: 0, STATUS_FILTERED: 1, STATUS_FAILED: 2}
    return min(rows, key=lambda r: (order.get(r["status"], 3), r["key"]))


def xy_grid(storage: Storage, x: str, y: str, prompt_id: str | None = None, out_path: str | None = None,
            show_filtered: bool = False, *, min_tile: int = 160, max_tile: int = 384) -> bytes | str:
    """An X/Y grid of ONE prompt: columns are the values of `x`, rows the values of `y` (each in the
    order they first appear in key order, which is the spec's order for sweep axes and the seed index
    for seeds), with headers, and a title with the prompt and the parameters that stay fixed.

    `x` and `y` may be any column that varies for that prompt (guidance_scale, num_inference_steps,
    seed, scheduler, width, height, negative_prompt, a passthrough column ...); otherwise PreviewError
    (a ValueError) names the axis and the columns that do vary. When a third column varies too, it is
    held at the value of the prompt's first sample and the title says so. Cells without an image
    (failed; filtered unless show_filtered finds it in quarantine/; missing) are labelled placeholders.
    Every image is scaled by one factor, `scale_factor(largest side, min_tile, max_tile)`.
    Default prompt: the prompt of the dataset's first key. Returns PNG bytes, or the path/URI written.
    """
    reader = OutputReader(storage)
    prompt_id, rows = _prompt_rows(reader, prompt_id)
    url = storage.url()
    if all(r["status"] == STATUS_FAILED for r in rows):
        errors = ", ".join(dict.fromkeys(str(r.get("error")) for r in rows))
        raise PreviewError(f"prompt_id {prompt_id!r} has no image to put in a grid: all {len(rows)} of its rows "
                           f"failed ({errors})")
    if x == y:
        raise PreviewError(f"x and y are both {x!r}; pick two different columns (that vary: "
                           f"{', '.join(varying_columns(rows)) or 'none'})")
    _check_axis(x, "x", rows, prompt_id, url)
    _check_axis(y, "y", rows, prompt_id, url)
    first = min(rows, key=lambda r: r["key"])
    held = [c for c in varying_columns(rows) if c not in (x, y)]
    rows = [r for r in rows if all(_hashable(r.get(c)) == _hashable(first.get(c)) for c in held)]
    xs, ys = _distinct(sorted(rows, key=lambda r: r["key"]), x), _distinct(sorted(rows, key=lambda r: r["key"]), y)
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for i, xv in enumerate(xs):
        for j, yv in enumerate(ys):
            here = [r for r in rows if _hashable(r.get(x)) == xv and _hashable(r.get(y)) == yv]
            if here:
                cells[i, j] = _best(here)
    images = reader.images(r for r in cells.values() if reader.has_image(r, show_filtered))

    max_w = max(int(r.get("width") or 1) for r in rows)
    max_h = max(int(r.get("height") or 1) for r in rows)
    factor = scale_factor(max(max_w, max_h), min_tile, max_tile)
    cell_w, cell_h = max(1, round(max_w * factor)), max(1, round(max_h * factor))
    f_head, f_title, f_small = font(14), font(16), font(12)
    lh_head, lh_title, lh_small = line_height(f_head), line_height(f_title), line_height(f_small)
    margin, gap = 16, 6

    col_labels = [wrap(f"{x}={fmt_value(v)}", f_head, cell_w, 3, hard=True) for v in xs]
    row_text = [f"{y}={fmt_value(v)}" for v in ys]
    row_head_w = math.ceil(min(max(_text_width(f_head, t) for t in row_text), 260)) + 12
    row_labels = [wrap(t, f_head, row_head_w - 12, max(1, cell_h // lh_head), hard=True) for t in row_text]
    col_head_h = max(len(lines) for lines in col_labels) * lh_head + 10
    grid_w = len(xs) * cell_w + (len(xs) - 1) * gap
    width = max(2 * margin + row_head_w + grid_w, 480)
    text_w = width - 2 * margin
    fixed = [f"prompt_id={fmt_value(prompt_id)}"]
    for c in AXIS_COLUMNS:
        if c in first and c not in (x, y):
            fixed.append(f"{c}={fmt_value(first.get(c))}" + (" (held; it varies)" if c in held else ""))
    fixed += [f"{c}={fmt_value(first.get(c))} (held; it varies)" for c in held if c not in AXIS_COLUMNS]
    title_lines = wrap(first.get("prompt") or "(no prompt)", f_title, text_w, 3)
    fixed_lines = wrap("  ·  ".join(fixed), f_small, text_w, 4)
    axes_line = f"x: {x}   y: {y}" + ("   (filtered images shown)" if show_filtered else "")
    title_h = len(title_lines) * lh_title + (len(fixed_lines) + 1) * lh_small + 12
    height = margin + title_h + col_head_h + len(ys) * cell_h + (len(ys) - 1) * gap + margin

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    ty = margin
    for line in title_lines:
        draw.text((margin, ty), line, font=f_title, fill=INK)
        ty += lh_title
    ty += 4
    for line in fixed_lines:
        draw.text((margin, ty), line, font=f_small, fill=MUTED)
        ty += lh_small
    draw.text((margin, ty), axes_line, font=f_small, fill=MUTED)
    grid_x0, grid_y0 = margin + row_head_w, margin + title_h + col_head_h
    for i, lines in enumerate(col_labels):
        cx = grid_x0 + i * (cell_w + gap)
        for k, line in enumerate(lines):
            lw = _text_width(f_head, line)
            draw.text((cx + (cell_w - lw) / 2, grid_y0 - col_head_h + 4 + k * lh_head), line, font=f_head, fill=INK)
    for j, lines in enumerate(row_labels):
        cy = grid_y0 + j * (cell_h + gap) + (cell_h - len(lines) * lh_head) / 2
        for k, line in enumerate(lines):
            draw.text((margin, cy + k * lh_head), line, font=f_head, fill=INK)

    meta_cells = []
    for j in range(len(ys)):
        for i in range(len(xs)):
            x0, y0 = grid_x0 + i * (cell_w + gap), grid_y0 + j * (cell_h + gap)
            row = cells.get((i, j))
            entry: dict[str, Any] = {"i": i, "j": j, "x": xs[i], "y": ys[j], "key": row and row["key"],
                                     "status": row and row["status"], "shown": False}
            if row is not None and row["key"] in images:
                im = scale_image(decode(images[row["key"]][1]), factor)
                ix, iy = x0 + (cell_w - im.width) // 2, y0 + (cell_h - im.height) // 2
                canvas.paste(im, (ix, iy))
                entry.update(box=[ix, iy, ix + im.width, iy + im.height], shown=True)
                if row["status"] == STATUS_FILTERED:
                    draw.rectangle([ix, iy, ix + im.width - 1, iy + im.height - 1], outline=RED, width=3)
                    label = f"FILTERED{_score(row)}"
                    draw.rectangle([ix, iy, ix + 8 + _text_width(f_small, label), iy + lh_small + 4], fill=RED)
                    draw.text((ix + 4, iy + 2), label, font=f_small, fill=BACKGROUND)
            else:
                entry["box"] = [x0, y0, x0 + cell_w, y0 + cell_h]
                draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=PLACEHOLDER, outline=MUTED)
                for k, line in enumerate(_placeholder_text(row, show_filtered, f_small, cell_w - 12)):
                    draw.text((x0 + 6, y0 + 6 + k * lh_small), line, font=f_small, fill=RED if k == 0 else MUTED)
            meta_cells.append(entry)
    meta = {"kind": "xy_grid", "x": x, "y": y, "prompt_id": prompt_id, "x_values": xs, "y_values": ys,
            "held": {c: first.get(c) for c in held}, "factor": factor, "cells": meta_cells}
    return _finish(storage, _png(canvas, meta), out_path)


def _placeholder_text(row: dict[str, Any] | None, show_filtered: bool, f, width: int) -> list[str]:
    if row is None:
        return ["not in the dataset"]
    if row["status"] == STATUS_FAILED:
        return ["failed", row["key"], *wrap(row.get("error") or "", f, width, 4)]
    if row["status"] == STATUS_FILTERED:
        why = "no image kept (action drop)" if show_filtered else "hidden; --show-filtered shows it"
        return [f"filtered{_score(row)}", row["key"], why]
    return ["image missing", row["key"], "shard tar not readable"]


# ------------------------------------------------------------------------------------ HTML gallery

_EMBED_AS_IS_BYTES = 48 * 1024
_THUMB_PX = 256


def _thumbnail_data_uri(ext: str, encoded: bytes, width: int, height: int) -> str:
    """Small images go in as they are (exact pixels); larger ones as a 256 px JPEG thumbnail."""
    if len(encoded) <= _EMBED_AS_IS_BYTES and max(width, height) <= _THUMB_PX:
        mime, data = IMAGE_EXTS[ext], encoded
    else:
        image = decode(encoded)
        image.thumbnail((_THUMB_PX, _THUMB_PX), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        mime, data = "image/jpeg", buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _jsonable(value: Any) -> Any:
    """A Parquet value as JSON the browser reads back exactly. Integers past 2**53 (the 63-bit seeds)
    become strings: JSON.parse would round them to the nearest double and show a wrong seed."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</script>', no '<!--', whatever the prompts hold."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def gallery_rows(reader: OutputReader, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of each status, in key order (so every status filter has something).
    Shards are read in order until every status has its rows, or after max(20 * limit, 20,000) rows:
    a dataset without failed rows is not read to its end to look for some."""
    taken = {s: 0 for s in STATUSES}
    out, scanned, budget = [], 0, max(20 * limit, 20_000)
    for shard in reader.shards:
        for row in reader.rows(shard):
            status = row["status"] if row["status"] in taken else STATUS_FAILED
            if taken[status] < limit:
                taken[status] += 1
                out.append(row)
        scanned += len(reader.rows(shard))
        if all(n >= limit for n in taken.values()) or scanned >= budget:
            break
    return out


def html_gallery(storage: Storage, out_name: str = f"{PREVIEW_DIR}/index.html", show_filtered: bool = False, *,
                 limit: int = 500, out_path: str | None = None) -> str:
    """Write a static, self-contained gallery page into the output and return its path or URI.

    The page shows the first `limit` rows of each status in key order: thumbnails of ok images,
    labelled cards for filtered and failed rows (filtered images only with show_filtered, from
    quarantine/), each with its status and nsfw score; a filter by status and a text search; and
    on click the sample's whole Parquet row as a table (nsfw_scores per class included). `#KEY` in
    the address opens that sample. Plain HTML, CSS and a little vanilla JS: no CDN, no network.

    Why thumbnails are embedded as data: URIs instead of extracted to preview/images/: the page is
    one object, so it opens the same from a local folder (file://) and from ONE presigned S3 URL.
    A presigned URL signs one object only: relative links from a presigned page to other private
    objects would be refused (403). It also adds no image files beside the tars. The cost is page
    size: images up to 256 px and 48 KB go in as they are (exact pixels), larger ones as 256 px
    JPEG thumbnails (~10-20 KB each), so the default of 500 rows per status stays a few MB; the
    click view shows the same thumbnail enlarged, not the full image (that stays in the tar).

    On S3, open it with `gallery_link(storage, out_name)`: a presigned HTTPS URL (valid `expiration`
    seconds, at most 7 days with SigV4; it must be signed by credentials that can read the object, and
    the endpoint must be reachable from the browser: a MinIO/moto endpoint on localhost only is not).
    `out_path` writes the page elsewhere instead (a local file or a URI).
    """
    reader = OutputReader(storage)
    rows = gallery_rows(reader, limit)
    images = reader.images(r for r in rows if reader.has_image(r, show_filtered))
    shown = {s: sum(1 for r in rows if r["status"] == s) for s in STATUSES}
    counts = reader.counts() or shown  # totals are known once the job has recorded its results
    cards, data = [], []
    for r in rows:
        row = {k: _jsonable(v) for k, v in r.items() if not k.startswith("_")}
        data.append(row)
        img = images.get(r["key"])
        status = r["status"]
        classes = ["card", f"s-{status}"] + (["flagged"] if r.get("safety_flagged") else [])
        score = r.get("nsfw_score")
        score_text = f"nsfw {score:.2f}" if isinstance(score, (int, float)) and not math.isnan(score) else "nsfw -"
        if img is not None:
            uri = _thumbnail_data_uri(img[0], img[1], int(r.get("width") or 0), int(r.get("height") or 0))
            small = max(int(r.get("width") or 0), int(r.get("height") or 0)) < 160
            visual = (f'<img src="{uri}" alt="{_esc(r["key"])}"'
                      f'{" class=pix" if small else ""} loading="lazy">')
        else:
            why = {STATUS_FILTERED: "filtered" + ("" if show_filtered else " (hidden)"),
                   STATUS_FAILED: "failed"}.get(status, "image missing")
            detail = r.get("error") if status == STATUS_FAILED else score_text
            visual = (f'<div class="ph"><b>{_esc(why)}</b><span>{_esc(clean(detail or ""))}</span>'
                      "</div>")
        cards.append(
            f'<figure class="{" ".join(classes)}" data-status="{_esc(status)}" '
            f'data-key="{_esc(r["key"])}" tabindex="0">{visual}<figcaption>'
            f'<span class="line"><span class="key">{_esc(r["key"])}</span> '
            f'<span class="badge">{_esc(status)}</span> '
            f'<span class="score">{_esc(score_text)}</span></span>'
            f'<span class="prompt">{_esc(clean(r.get("prompt") or ""))}</span></figcaption></figure>')
    spec = reader.job.get("spec") or {}
    axes = (spec.get("sweep") or {}).get("axes") or {}
    summary = [f"model {fmt_value((spec.get('model') or {}).get('source'), 80)}"] if spec else []
    summary += [f"{k}: {', '.join(fmt_value(v) for v in vals)}" for k, vals in axes.items()]
    if spec.get("sweep"):
        summary.append(f"seeds: {fmt_value(spec['sweep'].get('seeds'))}")
    filters = "".join(
        f'<label><input type="checkbox" name="status" value="{s}" checked> {s} '
        f'<span class="count">{shown[s]}{"" if shown[s] == counts.get(s, shown[s]) else f" of {counts[s]}"}'
        "</span></label>" for s in STATUSES)
    page = _PAGE.format(
        title=_esc(f"{reader.name}: preview"),
        heading=_esc(reader.name),
        where=_esc(storage.url()),
        summary=_esc(" · ".join(summary)),
        note=_esc("filtered images shown (from quarantine/)" if show_filtered
                         else "filtered images hidden"),
        filters=filters,
        cards="\n".join(cards),
        rows=_script_json(data),
    )
    if out_path is not None:
        return write_output(storage, out_path, page.encode())
    storage.write_bytes(out_name, page.encode())
    return storage.path(out_name) if storage.local else storage.url(out_name)


def gallery_link(storage: Storage, out_name: str = f"{PREVIEW_DIR}/index.html", expiration: int = 3600) -> str:
    """An address a browser can open: file:// locally, a presigned HTTPS URL on S3 (see html_gallery)."""
    if storage.local:
        return Path(storage.path(out_name)).as_uri()
    return storage.fs.sign(storage.path(out_name), expiration=expiration)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f4; color: #222; }}
header {{ padding: 12px 16px; background: #fff; border-bottom: 1px solid #ddd; position: sticky; top: 0; z-index: 1; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
.sub {{ color: #666; font-size: 12px; }}
.bar {{ margin-top: 8px; display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }}
.bar input[type=search] {{ padding: 4px 8px; min-width: 16em; }}
.count {{ color: #666; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(192px, 1fr)); gap: 12px; padding: 16px; }}
.card {{ margin: 0; background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 6px; cursor: pointer; }}
.card:hover, .card:focus {{ border-color: #3a6ee8; outline: none; }}
.card img, .ph {{ display: block; width: 160px; height: 160px; object-fit: contain; margin: 0 auto; background: #eee; }}
img.pix, #detail img.pix {{ image-rendering: pixelated; }}
.ph {{ display: flex; flex-direction: column; justify-content: center; align-items: center; text-align: center;
       color: #777; font-size: 12px; overflow: hidden; padding: 4px; box-sizing: border-box; }}
.ph b {{ color: #b22; font-size: 14px; }}
figcaption {{ font-size: 12px; margin-top: 4px; }}
.key {{ font-family: ui-monospace, monospace; }}
.badge {{ border-radius: 3px; padding: 0 4px; color: #fff; background: #2a8a3a; }}
.s-filtered {{ border-color: #d33; }} .s-filtered .badge {{ background: #d33; }}
.s-failed {{ border-color: #999; }} .s-failed .badge {{ background: #777; }}
.s-ok.flagged {{ border-color: #e80; }}
.score {{ color: #666; }}
.line {{ display: block; white-space: nowrap; overflow: hidden; }}
.prompt {{ display: block; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; color: #444; }}
.hidden {{ display: none; }}
#detail {{ position: fixed; inset: 0; background: rgba(0,0,0,.55); display: flex; align-items: flex-start;
           justify-content: center; padding: 24px; overflow: auto; z-index: 2; }}
#detail[hidden] {{ display: none; }}
#detail .panel {{ background: #fff; border-radius: 8px; padding: 16px; display: flex; gap: 16px; max-width: 1100px;
                  flex-wrap: wrap; }}
#detail .visual img {{ width: 384px; height: 384px; object-fit: contain; background: #eee; }}
#detail .visual .ph {{ width: 384px; height: 384px; }}
#detail table {{ border-collapse: collapse; font-size: 12px; max-width: 640px; }}
#detail th {{ text-align: left; padding: 2px 8px 2px 0; vertical-align: top; white-space: nowrap; color: #555; }}
#detail td {{ padding: 2px 0; word-break: break-all; font-family: ui-monospace, monospace; }}
#detail button {{ float: right; }}
</style></head>
<body>
<header>
<h1>{heading}</h1>
<div class="sub">{where} · {summary} · {note}</div>
<div class="bar" id="filters">{filters}
<input type="search" id="search" placeholder="search prompt, key, prompt_id" aria-label="search"></div>
</header>
<main id="grid">
{cards}
</main>
<div id="detail" hidden><div class="panel">
<div class="visual" id="detail-visual"></div>
<div><button id="close" type="button">close (Esc)</button><h2 id="detail-key"></h2>
<table id="meta"><tbody></tbody></table></div>
</div></div>
<script id="rows" type="application/json">{rows}</script>
<script>
"use strict";
const rows = JSON.parse(document.getElementById("rows").textContent);
const byKey = new Map(rows.map(r => [r.key, r]));
const cards = Array.from(document.querySelectorAll("#grid .card"));
const detail = document.getElementById("detail");

function fmt(v) {{
  if (v === null || v === undefined) return "null";
  if (Array.isArray(v) && v.length && typeof v[0] === "object" && "label" in v[0])
    return v.map(s => s.label + ": " + (typeof s.score === "number" ? s.score.toFixed(4) : s.score)).join(", ");
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}}

function applyFilters() {{
  const on = new Set(Array.from(document.querySelectorAll("#filters input[name=status]:checked"), i => i.value));
  const q = document.getElementById("search").value.trim().toLowerCase();
  for (const card of cards) {{
    const r = byKey.get(card.dataset.key);
    const text = (r.key + " " + (r.prompt || "") + " " + (r.prompt_id || "")).toLowerCase();
    card.classList.toggle("hidden", !on.has(card.dataset.status) || (q && !text.includes(q)));
  }}
}}

function show(key) {{
  const r = byKey.get(key), card = cards.find(c => c.dataset.key === key);
  if (!r || !card) return;
  const visual = document.getElementById("detail-visual");
  visual.replaceChildren(card.querySelector("img, .ph").cloneNode(true));
  document.getElementById("detail-key").textContent = r.key + " (" + r.status + ")";
  const body = document.querySelector("#meta tbody");
  body.replaceChildren();
  for (const [k, v] of Object.entries(r)) {{
    const tr = document.createElement("tr"), th = document.createElement("th"), td = document.createElement("td");
    th.textContent = k; td.textContent = fmt(v); tr.dataset.column = k;
    tr.append(th, td); body.append(tr);
  }}
  detail.hidden = false;
  if (location.hash !== "#" + key) history.replaceState(null, "", "#" + key);
}}

function hide() {{
  detail.hidden = true;
  history.replaceState(null, "", location.pathname + location.search);
}}

for (const card of cards) {{
  card.addEventListener("click", () => show(card.dataset.key));
  card.addEventListener("keydown", e => {{ if (e.key === "Enter") show(card.dataset.key); }});
}}
document.getElementById("filters").addEventListener("input", applyFilters);
document.getElementById("close").addEventListener("click", hide);
detail.addEventListener("click", e => {{ if (e.target === detail) hide(); }});
document.addEventListener("keydown", e => {{ if (e.key === "Escape") hide(); }});
if (location.hash.length > 1) show(decodeURIComponent(location.hash.slice(1)));
</script>
</body></html>
"""


# ------------------------------------------------------------------------------------ entry point


def parse_grid(grid: str) -> tuple[str, str]:
    """'x=guidance_scale,y=seed' (either order, spaces allowed) -> ('guidance_scale', 'seed')."""
    usage = f"--grid {grid!r}: expected x=AXIS,y=AXIS, e.g. --grid x=guidance_scale,y=seed"
    parts: dict[str, str] = {}
    for item in grid.split(","):
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or name not in ("x", "y") or name in parts or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise PreviewError(usage)
        parts[name] = value
    if set(parts) != {"x", "y"}:
        raise PreviewError(usage)
    return parts["x"], parts["y"]


def run_preview(output: str, out: str | None = None, grid: str | None = None, prompt_id: str | None = None,
                html: bool = False, show_filtered: bool = False, limit: int = 64,
                storage_options: dict[str, Any] | None = None) -> str:
    """`sdfleet preview OUTPUT`: write one preview and print (and return) where it is.

    - default: a contact sheet of `limit` images, to OUTPUT/preview/contact_sheet.png
    - `grid="x=AXIS,y=AXIS"`: an X/Y grid of `prompt_id` (default: the first prompt), to
      OUTPUT/preview/xy_{x}_{y}.png (…_{hash of the prompt id}.png for another prompt)
    - `html=True`: the gallery, `limit` rows per status, to OUTPUT/preview/index.html; prints also
      the address to open (file:// or a presigned S3 URL valid for one hour)
    `out` (a local path or URI) writes there instead of into the output.
    """
    if html and grid:
        raise PreviewError("--html and --grid make different previews; ask for one at a time")
    if limit < 1:
        raise PreviewError(f"--limit must be at least 1, not {limit}")
    storage = Storage(output, storage_options)
    if grid:
        x, y = parse_grid(grid)
        suffix = "" if prompt_id is None else "_" + hashlib.sha256(prompt_id.encode()).hexdigest()[:10]
        target = out or storage.url(f"{PREVIEW_DIR}/xy_{x}_{y}{suffix}.png")
        written = xy_grid(storage, x, y, prompt_id=prompt_id, out_path=target, show_filtered=show_filtered)
    elif html:
        if out:
            written = html_gallery(storage, show_filtered=show_filtered, limit=limit, out_path=out)
        else:
            written = html_gallery(storage, show_filtered=show_filtered, limit=limit)
    else:
        target = out or storage.url(f"{PREVIEW_DIR}/contact_sheet.png")
        written = contact_sheet(storage, target, limit=limit, show_filtered=show_filtered)
    print(written)
    if html:
        if out is None and not storage.local:
            print(f"open (valid 1 h): {gallery_link(storage)}")
        elif not is_remote(written):
            print(f"open: {Path(written).as_uri()}")
    return str(written)


def add_preview_arguments(p: argparse.ArgumentParser) -> None:
    """The `sdfleet preview` arguments, for the CLI to add to its subparser."""
    p.add_argument("output", help="output folder or s3:// prefix")
    p.add_argument("--out", help="write here (a local file or URI) instead of OUTPUT/preview/")
    p.add_argument("--grid", metavar="x=AXIS,y=AXIS",
                   help="X/Y grid of one prompt across two varying columns, e.g. x=guidance_scale,y=seed")
    p.add_argument("--prompt-id", help="the prompt of the X/Y grid (default: the first prompt)")
    p.add_argument("--html", action="store_true", help="write a static HTML gallery to OUTPUT/preview/index.html")
    p.add_argument("--show-filtered", action="store_true", help="show images held in quarantine/ (marked)")
    p.add_argument("--limit", type=int, default=64,
                   help="contact sheet: images (default 64); --html: rows per status (default 64)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdfleet preview", description=__doc__.splitlines()[0])
    add_preview_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_preview(args.output, args.out, args.grid, args.prompt_id, args.html, args.show_filtered, args.limit)
    except (PreviewError, FileNotFoundError, PermissionError) as e:
        print(f"sdfleet preview: error: {e}", file=sys.stderr)
        return _collect(1)
    return 0


def _collect(code: int) -> int:
    """Free the failed call's frames now: Arrow objects left in a traceback cycle until interpreter
    teardown abort the process ("terminate called without an active exception")."""
    import gc

    gc.collect()
    return code


if __name__ == "__main__":
    sys.exit(main())
