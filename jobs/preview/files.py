"""What a preview writes: PNGs that carry their own layout, and the place each file goes.

Every PNG written here carries a `sdfleet-preview` text chunk: JSON with the kind of preview and,
per tile or cell, its key, status and pixel box, so tools (and the tests) can map pixels to samples.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sdfleet.actors.storage import Storage
from sdfleet.schemas.locations import is_remote

META_KEY = "sdfleet-preview"


def encode_png(image: Image.Image, meta: dict[str, Any]) -> bytes:
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
        storage.write_bytes(target[len(base) :], data)
        return target
    if is_remote(target):
        parent, _, name = target.rstrip("/").rpartition("/")
        Storage(parent).write_bytes(name, data)
        return target
    path = Path(target.removeprefix("file://")).absolute()
    Storage(str(path.parent)).write_bytes(path.name, data)
    return str(path)


def png_or_written(storage: Storage, png: bytes, out_path: str | None) -> bytes | str:
    """The PNG itself, or where it was written when `out_path` is given."""
    return png if out_path is None else write_output(storage, out_path, png)
