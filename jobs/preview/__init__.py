"""`sdfleet preview`: look at an output as a contact sheet, an X/Y grid of one prompt, or an HTML gallery.

Everything is read through `sdfleet.jobs.output.OutputReader`, so a preview shows the committed
shards only, and a local folder and an `s3://` prefix work alike. Only Pillow, pyarrow and Jinja2
are needed: no torch, no Ray.

- `contact_sheet(reader, out_path=None, limit=64)` (sheet.py): a PNG of a deterministic sample of
  images, each tile with its key and the start of its prompt; `small_contact_sheet(reader)` for the
  dataset card.
- `xy_grid(reader, x, y, prompt_id=None)` (grid.py): one prompt across two varying columns.
- `html_gallery(reader)` (gallery.py, gallery.html.j2): one self-contained `preview/index.html`.
- `run_preview(...)`, `add_arguments`, `command`: the command itself.

Filtered images are never shown unless `show_filtered=True`; they then come from
`quarantine/{shard}.tar` (safety.action=quarantine; `drop` keeps no image) and are marked. Every
PNG carries its layout (`read_preview_meta`). File names come from keys, axis names and a hash of
the prompt id, never from prompt text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from sdfleet.jobs.output import OutputReader
from sdfleet.jobs.preview.draw import PLACEHOLDER, RED, scale_factor
from sdfleet.jobs.preview.errors import PreviewError
from sdfleet.jobs.preview.files import read_preview_meta, write_output
from sdfleet.jobs.preview.gallery import gallery_link, html_gallery
from sdfleet.jobs.preview.grid import varying_columns, xy_grid
from sdfleet.jobs.preview.sheet import contact_sheet, select_sample, small_contact_sheet
from sdfleet.jobs.preview.text import font, wrap
from sdfleet.schemas import layout
from sdfleet.schemas.errors import EXIT_OK
from sdfleet.schemas.locations import is_remote

__all__ = [
    "PLACEHOLDER",
    "RED",
    "PreviewError",
    "add_arguments",
    "command",
    "contact_sheet",
    "font",
    "gallery_link",
    "html_gallery",
    "parse_grid",
    "read_preview_meta",
    "run_preview",
    "scale_factor",
    "select_sample",
    "small_contact_sheet",
    "varying_columns",
    "wrap",
    "write_output",
    "xy_grid",
]

AXIS_NAME = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*"
)  # a column name; it also goes into the grid's file name


def parse_grid(grid: str) -> tuple[str, str]:
    """'x=guidance_scale,y=seed' (either order, spaces allowed) -> ('guidance_scale', 'seed')."""
    usage = f"--grid {grid!r}: expected x=AXIS,y=AXIS, e.g. --grid x=guidance_scale,y=seed"
    parts: dict[str, str] = {}
    for item in grid.split(","):
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or name not in ("x", "y") or name in parts or not AXIS_NAME.fullmatch(value):
            raise PreviewError(usage)
        parts[name] = value
    if set(parts) != {"x", "y"}:
        raise PreviewError(usage)
    return parts["x"], parts["y"]


def run_preview(
    output: str,
    out: str | None = None,
    grid: str | None = None,
    prompt_id: str | None = None,
    html: bool = False,
    show_filtered: bool = False,
    limit: int = 64,
    storage_options: dict[str, Any] | None = None,
) -> str:
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
    reader = OutputReader.open(output, storage_options)
    storage = reader.storage
    if grid:
        x, y = parse_grid(grid)
        target = out or storage.url(layout.xy_grid_file(x, y, prompt_id))
        written = xy_grid(
            reader, x, y, prompt_id=prompt_id, out_path=target, show_filtered=show_filtered
        )
    elif html:
        written = html_gallery(reader, show_filtered=show_filtered, limit=limit, out_path=out)
    else:
        written = contact_sheet(
            reader,
            out or storage.url(layout.CONTACT_SHEET),
            limit=limit,
            show_filtered=show_filtered,
        )
    print(written)
    if html:
        if out is None and not storage.local:
            print(f"open (valid 1 h): {gallery_link(reader)}")
        elif not is_remote(written):
            print(f"open: {Path(written).as_uri()}")
    return str(written)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sdfleet preview` arguments, for the CLI to add to its subparser."""
    p.add_argument(
        "output",
        help="output folder or s3:// prefix, or the job's spec file (then its output.uri "
        "and storage_options)",
    )
    p.add_argument("--out", help="write here (a local file or URI) instead of OUTPUT/preview/")
    p.add_argument(
        "--grid",
        metavar="x=AXIS,y=AXIS",
        help="X/Y grid of one prompt across two varying columns, e.g. x=guidance_scale,y=seed",
    )
    p.add_argument("--prompt-id", help="the prompt of the X/Y grid (default: the first prompt)")
    p.add_argument(
        "--html",
        action="store_true",
        help="write a static HTML gallery to OUTPUT/preview/index.html",
    )
    p.add_argument(
        "--show-filtered", action="store_true", help="show images held in quarantine/ (marked)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=64,
        help="contact sheet: images (default 64); --html: rows per status (default 64)",
    )


def command(args: argparse.Namespace) -> int:
    """Run `sdfleet preview` from parsed arguments; errors are the CLI's to report."""
    if args.prompt_id is not None and not args.grid:
        raise PreviewError(
            "--prompt-id picks the prompt of an X/Y grid; give --grid x=AXIS,y=AXIS with it"
        )
    run_preview(
        args.output,
        args.out,
        args.grid,
        args.prompt_id,
        args.html,
        args.show_filtered,
        args.limit,
        storage_options=args.storage_options,
    )
    return EXIT_OK
