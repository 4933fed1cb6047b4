"""The X/Y grid: one prompt across two varying columns, like the X/Y plot of the Stable Diffusion web UIs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from sdfleet.jobs.output import OutputReader
from sdfleet.jobs.preview.draw import (
    BACKGROUND,
    INK,
    MUTED,
    PLACEHOLDER,
    RED,
    decode,
    nsfw_label,
    scale_factor,
    scale_image,
)
from sdfleet.jobs.preview.errors import PreviewError
from sdfleet.jobs.preview.files import encode_png, png_or_written
from sdfleet.jobs.preview.text import Font, fmt_value, font, line_height, text_width, wrap
from sdfleet.schemas.rows import STATUS_FAILED, STATUS_FILTERED, STATUS_OK, every_output_column
from sdfleet.schemas.samples import SWEEP_COORDINATES

# The columns a sweep varies (a sweep point's coordinates), in the order they are offered when an
# axis is wrong; besides them, the input's passthrough columns may be axes.
AXIS_COLUMNS = SWEEP_COORDINATES
# Every other output column (a family's too: T5's token counts, FLUX.1's scheduler_mu, SDXL's
# size conditioning, which follow the swept values) describes the result or how it was made:
# never an axis, nor a column to hold a grid at.
NOT_AXES = every_output_column() - frozenset(AXIS_COLUMNS)

MARGIN = 16
GAP = 6  # between cells: thin, so neighbouring images compare at a glance
MIN_WIDTH = 480  # a grid of one or two small cells still leaves its title a readable line length
ROW_HEADER_MAX = 260  # longer row headers wrap rather than push the cells off to the right
HEADER_PAD = 12
TITLE_PX, HEADER_PX, SMALL_PX = 16, 14, 12


@dataclass
class _Plot:
    """What the grid shows: one prompt's samples, placed by their x and y values."""

    prompt_id: str
    x: str
    y: str
    first: dict[str, Any]  # the prompt's first sample: held columns keep its values
    held: list[str]  # other columns that vary, held at the first sample's value
    rows: list[dict[str, Any]]  # the samples at the held values
    xs: list[Any]
    ys: list[Any]
    cells: dict[tuple[int, int], dict[str, Any]]  # (i, j) -> the row drawn there


@dataclass
class _Layout:
    factor: float
    cell_w: int
    cell_h: int
    col_labels: list[list[str]]
    row_labels: list[list[str]]
    title_lines: list[str]
    fixed_lines: list[str]
    axes_line: str
    width: int
    height: int
    grid_x0: int
    grid_y0: int
    col_head_h: int

    def cell_origin(self, i: int, j: int) -> tuple[int, int]:
        return self.grid_x0 + i * (self.cell_w + GAP), self.grid_y0 + j * (self.cell_h + GAP)


def varying_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns that take more than one value among `rows`: the sweep axes first, then any other."""
    names = [c for c in AXIS_COLUMNS if rows and c in rows[0]]
    names += [
        c
        for c in (rows[0] if rows else {})
        if c not in AXIS_COLUMNS and c not in NOT_AXES and not c.startswith("_")
    ]
    return [c for c in names if len(_distinct(rows, c)) > 1]


def xy_grid(
    reader: OutputReader,
    x: str,
    y: str,
    prompt_id: str | None = None,
    out_path: str | None = None,
    show_filtered: bool = False,
    *,
    min_tile: int = 160,
    max_tile: int = 384,
) -> bytes | str:
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
    prompt_id, rows = _prompt_rows(reader, prompt_id)
    _check_axes(rows, prompt_id, x, y, reader.storage.url())
    plot = _plot(rows, prompt_id, x, y)
    images = reader.images(r for r in plot.cells.values() if reader.has_image(r, show_filtered))
    layout = _measure(plot, show_filtered, min_tile, max_tile)

    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_title(draw, layout)
    _draw_axis_headers(draw, layout)
    meta_cells = [
        _draw_cell(canvas, draw, plot, layout, images, i, j, show_filtered)
        for j in range(len(plot.ys))
        for i in range(len(plot.xs))
    ]
    meta = {
        "kind": "xy_grid",
        "x": x,
        "y": y,
        "prompt_id": prompt_id,
        "x_values": plot.xs,
        "y_values": plot.ys,
        "held": {c: plot.first.get(c) for c in plot.held},
        "factor": layout.factor,
        "cells": meta_cells,
    }
    return png_or_written(reader.storage, encode_png(canvas, meta), out_path)


# ------------------------------------------------------------------------------------ which samples


def _prompt_rows(reader: OutputReader, prompt_id: str | None) -> tuple[str, list[dict[str, Any]]]:
    """All rows of one prompt (the first prompt of the dataset by default). A prompt's samples are
    contiguous in key order, so the scan stops at the first shard after them that has none (rows of
    a repeated prompt id further on are failed duplicates; `_best` prefers a usable row per cell)."""
    if not reader.shards:
        raise PreviewError(
            f"{reader.storage.url()} has no committed shard yet: previews show committed shards "
            "only (`sdfleet status` shows how the job stands)"
        )
    if (
        prompt_id is None
    ):  # the first prompt whose rows did not all fail (an empty prompt's rows do)
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
            seen_ids.extend(
                i
                for i in dict.fromkeys(r.get("prompt_id") for r in reader.rows(shard))
                if i not in seen_ids
            )
    if not found:
        raise PreviewError(
            f"prompt_id {prompt_id!r} is not in {reader.storage.url()} (its first prompt ids: "
            f"{', '.join(map(str, seen_ids[:5]))})"
        )
    return str(prompt_id), found


def _check_axes(rows: list[dict[str, Any]], prompt_id: str, x: str, y: str, url: str) -> None:
    if all(r["status"] == STATUS_FAILED for r in rows):
        errors = ", ".join(dict.fromkeys(str(r.get("error")) for r in rows))
        raise PreviewError(
            f"prompt_id {prompt_id!r} has no image to put in a grid: all {len(rows)} of its rows "
            f"failed ({errors})"
        )
    if x == y:
        raise PreviewError(
            f"x and y are both {x!r}; pick two different columns (that vary: "
            f"{', '.join(varying_columns(rows)) or 'none'})"
        )
    _check_axis(x, "x", rows, prompt_id, url)
    _check_axis(y, "y", rows, prompt_id, url)


def _check_axis(
    axis: str, which: str, rows: list[dict[str, Any]], prompt_id: str, url: str
) -> None:
    varying = varying_columns(rows)
    vary_text = ", ".join(varying) if varying else "none"
    if axis not in rows[0] or axis.startswith("_"):
        raise PreviewError(
            f"{which} axis {axis!r} is not a column of {url}; columns that vary for prompt_id "
            f"{prompt_id!r}: {vary_text}"
        )
    if axis in NOT_AXES:
        raise PreviewError(
            f"{which} axis {axis!r} is a result column, not a sweep axis; columns that vary for "
            f"prompt_id {prompt_id!r}: {vary_text}"
        )
    if axis not in varying:
        raise PreviewError(
            f"{which} axis {axis!r} does not vary for prompt_id {prompt_id!r} (every row has "
            f"{axis}={fmt_value(rows[0].get(axis))}); columns that vary: {vary_text}"
        )


def _plot(rows: list[dict[str, Any]], prompt_id: str, x: str, y: str) -> _Plot:
    """Hold every other varying column at the first sample's value, then give each (x, y) its row."""
    first = min(rows, key=lambda r: r["key"])
    held = [c for c in varying_columns(rows) if c not in (x, y)]
    rows = [r for r in rows if all(_hashable(r.get(c)) == _hashable(first.get(c)) for c in held)]
    in_key_order = sorted(rows, key=lambda r: r["key"])
    xs, ys = _distinct(in_key_order, x), _distinct(in_key_order, y)
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for i, xv in enumerate(xs):
        for j, yv in enumerate(ys):
            here = [r for r in rows if _hashable(r.get(x)) == xv and _hashable(r.get(y)) == yv]
            if here:
                cells[i, j] = _best(here)
    return _Plot(
        prompt_id=prompt_id, x=x, y=y, first=first, held=held, rows=rows, xs=xs, ys=ys, cells=cells
    )


def _distinct(rows: list[dict[str, Any]], column: str) -> list[Any]:
    return list(dict.fromkeys(_hashable(r.get(column)) for r in rows))


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row to draw when a cell has several: one with an image first."""
    order = {STATUS_OK: 0, STATUS_FILTERED: 1, STATUS_FAILED: 2}
    return min(rows, key=lambda r: (order.get(r["status"], 3), r["key"]))


# ------------------------------------------------------------------------------------ layout


def _measure(plot: _Plot, show_filtered: bool, min_tile: int, max_tile: int) -> _Layout:
    """Cell size (every image scaled by one factor), the headers wrapped to it, and the title above."""
    head, title, small = font(HEADER_PX), font(TITLE_PX), font(SMALL_PX)
    lh_head = line_height(head)
    max_w = max(int(r.get("width") or 1) for r in plot.rows)
    max_h = max(int(r.get("height") or 1) for r in plot.rows)
    factor = scale_factor(max(max_w, max_h), min_tile, max_tile)
    cell_w, cell_h = max(1, round(max_w * factor)), max(1, round(max_h * factor))

    col_labels = [wrap(f"{plot.x}={fmt_value(v)}", head, cell_w, 3, hard=True) for v in plot.xs]
    row_text = [f"{plot.y}={fmt_value(v)}" for v in plot.ys]
    row_head_w = (
        math.ceil(min(max(text_width(head, t) for t in row_text), ROW_HEADER_MAX)) + HEADER_PAD
    )
    row_labels = [
        wrap(t, head, row_head_w - HEADER_PAD, max(1, cell_h // lh_head), hard=True)
        for t in row_text
    ]
    col_head_h = max(len(lines) for lines in col_labels) * lh_head + 10
    grid_w = len(plot.xs) * cell_w + (len(plot.xs) - 1) * GAP
    width = max(2 * MARGIN + row_head_w + grid_w, MIN_WIDTH)

    text_w = width - 2 * MARGIN
    title_lines = wrap(plot.first.get("prompt") or "(no prompt)", title, text_w, 3)
    fixed_lines = wrap("  ·  ".join(_fixed_parameters(plot)), small, text_w, 4)
    axes_line = f"x: {plot.x}   y: {plot.y}" + (
        "   (filtered images shown)" if show_filtered else ""
    )
    title_h = (
        len(title_lines) * line_height(title) + (len(fixed_lines) + 1) * line_height(small) + 12
    )
    grid_h = len(plot.ys) * cell_h + (len(plot.ys) - 1) * GAP
    return _Layout(
        factor=factor,
        cell_w=cell_w,
        cell_h=cell_h,
        col_labels=col_labels,
        row_labels=row_labels,
        title_lines=title_lines,
        fixed_lines=fixed_lines,
        axes_line=axes_line,
        width=width,
        height=MARGIN + title_h + col_head_h + grid_h + MARGIN,
        grid_x0=MARGIN + row_head_w,
        grid_y0=MARGIN + title_h + col_head_h,
        col_head_h=col_head_h,
    )


def _fixed_parameters(plot: _Plot) -> list[str]:
    """The parameters every cell shares, held ones marked as such."""
    first, axes = plot.first, (plot.x, plot.y)
    fixed = [f"prompt_id={fmt_value(plot.prompt_id)}"]
    for c in AXIS_COLUMNS:
        # A coordinate null in every row is not one this job has (a task parameter elsewhere).
        if c in first and c not in axes and _distinct(plot.rows, c) != [None]:
            fixed.append(
                f"{c}={fmt_value(first.get(c))}" + (" (held; it varies)" if c in plot.held else "")
            )
    fixed += [
        f"{c}={fmt_value(first.get(c))} (held; it varies)"
        for c in plot.held
        if c not in AXIS_COLUMNS
    ]
    return fixed


# ------------------------------------------------------------------------------------ drawing


def _draw_title(draw: ImageDraw.ImageDraw, layout: _Layout) -> None:
    title, small = font(TITLE_PX), font(SMALL_PX)
    ty = MARGIN
    for line in layout.title_lines:
        draw.text((MARGIN, ty), line, font=title, fill=INK)
        ty += line_height(title)
    ty += 4
    for line in layout.fixed_lines:
        draw.text((MARGIN, ty), line, font=small, fill=MUTED)
        ty += line_height(small)
    draw.text((MARGIN, ty), layout.axes_line, font=small, fill=MUTED)


def _draw_axis_headers(draw: ImageDraw.ImageDraw, layout: _Layout) -> None:
    """x values centred over their columns, y values left of their rows."""
    head = font(HEADER_PX)
    lh = line_height(head)
    for i, lines in enumerate(layout.col_labels):
        cx, _ = layout.cell_origin(i, 0)
        for k, line in enumerate(lines):
            left = cx + (layout.cell_w - text_width(head, line)) / 2
            draw.text(
                (left, layout.grid_y0 - layout.col_head_h + 4 + k * lh), line, font=head, fill=INK
            )
    for j, lines in enumerate(layout.row_labels):
        _, cy = layout.cell_origin(0, j)
        top = cy + (layout.cell_h - len(lines) * lh) / 2
        for k, line in enumerate(lines):
            draw.text((MARGIN, top + k * lh), line, font=head, fill=INK)


def _draw_cell(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    plot: _Plot,
    layout: _Layout,
    images: dict[str, tuple[str, bytes]],
    i: int,
    j: int,
    show_filtered: bool,
) -> dict[str, Any]:
    """Cell (i, j): its image (a filtered one framed and labelled in red) or a labelled placeholder.
    Returns the cell's entry for the PNG's layout metadata."""
    x0, y0 = layout.cell_origin(i, j)
    row = plot.cells.get((i, j))
    entry: dict[str, Any] = {
        "i": i,
        "j": j,
        "x": plot.xs[i],
        "y": plot.ys[j],
        "key": row and row["key"],
        "status": row and row["status"],
        "shown": False,
    }
    small = font(SMALL_PX)
    if row is None or row["key"] not in images:
        entry["box"] = [x0, y0, x0 + layout.cell_w, y0 + layout.cell_h]
        draw.rectangle(
            [x0, y0, x0 + layout.cell_w - 1, y0 + layout.cell_h - 1],
            fill=PLACEHOLDER,
            outline=MUTED,
        )
        for k, line in enumerate(_placeholder_text(row, show_filtered, small, layout.cell_w - 12)):
            draw.text(
                (x0 + 6, y0 + 6 + k * line_height(small)),
                line,
                font=small,
                fill=RED if k == 0 else MUTED,
            )
        return entry
    im = scale_image(decode(images[row["key"]][1]), layout.factor)
    ix, iy = x0 + (layout.cell_w - im.width) // 2, y0 + (layout.cell_h - im.height) // 2
    canvas.paste(im, (ix, iy))
    entry.update(box=[ix, iy, ix + im.width, iy + im.height], shown=True)
    if row["status"] == STATUS_FILTERED:
        draw.rectangle([ix, iy, ix + im.width - 1, iy + im.height - 1], outline=RED, width=3)
        label = f"FILTERED{nsfw_label(row)}"
        draw.rectangle(
            [ix, iy, ix + 8 + text_width(small, label), iy + line_height(small) + 4], fill=RED
        )
        draw.text((ix + 4, iy + 2), label, font=small, fill=BACKGROUND)
    return entry


def _placeholder_text(
    row: dict[str, Any] | None, show_filtered: bool, f: Font, width: int
) -> list[str]:
    if row is None:
        return ["not in the dataset"]
    if row["status"] == STATUS_FAILED:
        return ["failed", row["key"], *wrap(row.get("error") or "", f, width, 4)]
    if row["status"] == STATUS_FILTERED:
        why = "no image kept (action drop)" if show_filtered else "hidden; --show-filtered shows it"
        return [f"filtered{nsfw_label(row)}", row["key"], why]
    return ["image missing", row["key"], "shard tar not readable"]
