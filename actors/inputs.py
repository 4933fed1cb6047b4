"""Input images for the image tasks: each row's image (and mask), read and decoded by the worker.

A cell holds encoded image bytes, or a URI: a path relative to the input's folder, or an
absolute URI inside it. Whoever wrote the Parquet may be hostile, so a URI that leaves the
input's folder (`..`, another bucket, an absolute path elsewhere) or holds a control character (a
NUL byte) is refused, and so is an image over Pillow's pixel limit (a decompression bomb) or in a
format outside INPUT_IMAGE_FORMATS. Every refusal, and any exception a decoder raises, is one
row's error; the shard goes on. Decoding is explicit (EXIF orientation applied, then RGB, or L for a mask), so the same
bytes always give the same input pixels.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdfleet.actors.storage import Storage
from sdfleet.schemas import layout
from sdfleet.schemas.errors import StorageError
from sdfleet.schemas.locations import check_inside, input_folder, is_remote
from sdfleet.schemas.samples import InputImage

# The formats (Pillow's names) an input image may be in, checked by Pillow before any decoder runs.
# They are the formats sdfleet writes (so an earlier output reads back) and what image datasets
# hold. Every other decoder Pillow carries is surface a hostile Parquet could reach: EPS runs
# Ghostscript, TIFF is libtiff with its many compressions, and none of them is needed for a
# prompt's input. JPEG's opener also returns cameras' multi-picture JPEGs (MPO): the first
# picture is decoded, as any viewer shows it.
INPUT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
ALLOWED_FORMATS_TEXT = "JPEG, PNG or WebP"


@dataclass
class Cell:
    """One row's image or mask value, resolved: bytes to decode, or why there are none."""

    data: bytes | None = None
    uri: str | None = None
    name: str | None = None  # the URI's path inside the input's folder
    error: str | None = None


class InputImageReader:
    """Reads the image (or mask) cells of one shard's rows: URIs concurrently, all at once."""

    def __init__(self, input_uri: str, storage_options: dict[str, Any] | None = None):
        self.folder = input_folder(input_uri)
        self.storage_options = storage_options or {}
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.folder, self.storage_options)
        return self._storage

    def read(self, values: list[Any], what: str, mask: bool = False) -> list[InputImage | str]:
        """Each value as a decoded InputImage, or the reason (a string) it cannot be one."""
        # 1. Resolve each value to inline bytes or a name inside the input's folder.
        cells, names = [], {}
        for v in values:
            cell = self.resolve(v, what)
            cells.append(cell)
            if cell.data is None and cell.error is None:
                names.setdefault(cell.name, []).append(cell)
        # 2. Fetch the named files at once (concurrent GETs on an object store).
        if names:
            for name, found in self.storage.read_many(list(names)).items():
                for cell in names[name]:
                    if isinstance(found, BaseException):
                        missing = isinstance(found, FileNotFoundError)
                        cell.error = (
                            f"{what} {cell.uri} does not exist"
                            if missing
                            else f"{what} {cell.uri} cannot be read: {type(found).__name__}: {found}"
                        )
                    else:
                        cell.data = found
        # 3. Decode; the same bytes decode once per shard (sweep points share their row's image).
        decoded: dict[tuple[str, str | None], InputImage | str] = {}
        out: list[InputImage | str] = []
        for cell in cells:
            if cell.error:
                out.append(cell.error)
                continue
            digest = hashlib.sha256(cell.data).hexdigest()
            if (digest, cell.uri) not in decoded:
                decoded[digest, cell.uri] = decode(cell.data, what, cell.uri, digest, mask)
            out.append(decoded[digest, cell.uri])
        return out

    def resolve(self, value: Any, what: str) -> Cell:
        """Inline bytes, or the name inside the input's folder that a URI cell points at (not read
        here), or why it is neither."""
        if value is None:
            return Cell(error=f"{what} is null")
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            return Cell(data=data) if data else Cell(error=f"{what} is empty (0 bytes)")
        if not isinstance(value, str) or not value.strip():
            return Cell(
                error=f"{what} is {value!r}: give encoded image bytes or a URI inside {self.folder}"
            )
        uri = value.strip()
        control = next((c for c in uri if unicodedata.category(c) == "Cc"), None)
        if control is not None:  # a NUL byte ends a C path; no store names a file with one
            return Cell(
                error=f"{what} URI {uri!r} holds the control character {control!r}; refusing it"
            )
        return self._inside(uri, what)

    def _inside(self, uri: str, what: str) -> Cell:
        """A URI or relative path, kept only if it names a file inside the input's folder."""
        folder = self.folder.rstrip("/")
        outside = Cell(
            error=f"{what} {uri} is outside the input's folder {folder}; refusing to read it"
        )
        if "://" in uri or uri.startswith("/"):
            scheme = uri.split("://", 1)[0] if "://" in uri else ""
            ours = folder.split("://", 1)[0] if is_remote(folder) else ""
            if scheme != ours and not (scheme == "file" and not ours):
                return outside
            path = uri.removeprefix("file://")
            relative = (
                posixpath.relpath(posixpath.normpath(path), folder.removeprefix("file://"))
                if not ours
                else _relative_key(path, folder)
            )
        else:
            relative = uri
        normal = posixpath.normpath(relative)
        if (
            normal.startswith("../")
            or normal in ("..", ".")
            or normal.startswith("/")
            or "\\" in relative
        ):
            return outside
        if not is_remote(folder):
            try:  # a symlink inside the folder may point out of it
                check_inside(Path(folder), normal, f"{what} {uri}")
            except StorageError:
                return outside
        return Cell(uri=f"{folder}/{normal}", name=normal)


def _relative_key(uri: str, folder: str) -> str:
    """An object URI relative to the folder's, '../…' if it is not below it (another bucket too)."""
    prefix = folder.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return "../" + uri
    return uri[len(prefix) :]


def decode(data: bytes, what: str, uri: str | None, digest: str, mask: bool) -> InputImage | str:
    """Decoded pixels, or why not: a format outside INPUT_IMAGE_FORMATS, not an image, over
    Pillow's pixel limit, truncated, or anything else its decoder raised."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = f" {uri}" if uri else ""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=INPUT_IMAGE_FORMATS)
            image = ImageOps.exif_transpose(image)
            image = image.convert("L" if mask else "RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return (
            f"{what}{where} is refused as a decompression bomb ({e}); Pillow's limit is "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels"
        )
    except UnidentifiedImageError:
        return _unidentified(data, what, where)
    except Exception as e:  # noqa: BLE001 -- truncated, corrupt: any decoder error is the row's
        return f"{what}{where} cannot be decoded: {type(e).__name__}: {e}"
    if min(image.size) < 8:
        return f"{what}{where} is {image.size[0]}x{image.size[1]}; the pipeline needs at least 8x8 pixels"
    return InputImage(image, digest, uri)


def _unidentified(data: bytes, what: str, where: str) -> str:
    """Why Pillow found no allowed format in `data`: the format its first bytes look like, or
    those bytes."""
    looks_like = _looks_like(data[:16])
    if looks_like is not None and looks_like not in INPUT_IMAGE_FORMATS:
        return (
            f"{what}{where} looks like {looks_like} ({len(data)} bytes); sdfleet decodes only "
            f"{ALLOWED_FORMATS_TEXT} images: convert it to one of them"
        )
    return (
        f"{what}{where} is not a {ALLOWED_FORMATS_TEXT} image Pillow can decode ({len(data)} bytes "
        f"starting {data[:8]!r})"
    )


def _looks_like(head: bytes) -> str | None:
    """The first Pillow format whose signature check accepts `head`: only the plugins' byte
    comparisons run (the ones Image.open runs before choosing a decoder), never a decoder."""
    from PIL import Image

    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # noqa: BLE001 -- only a hint for the message; no name is fine
            continue
    return None


def read_row_inputs(
    reader: InputImageReader, images: dict[int, Any], masks: dict[int, Any] | None
) -> dict[int, tuple[InputImage, InputImage | None] | str]:
    """Each row's (image, mask), or the reason the row cannot be generated. Rows: global row ->
    its image cell (and mask cell, for inpaint)."""
    rows = list(images)
    found = dict(zip(rows, reader.read([images[r] for r in rows], "input image")))
    found_masks = (
        dict(zip(rows, reader.read([masks[r] for r in rows], "mask", mask=True))) if masks else {}
    )
    out: dict[int, tuple[InputImage, InputImage | None] | str] = {}
    for r in rows:
        image, mask = found[r], found_masks.get(r)
        if isinstance(image, str) or isinstance(mask, str):
            out[r] = image if isinstance(image, str) else mask
        elif mask is not None and mask.size != image.size:
            out[r] = (
                f"mask is {mask.size[0]}x{mask.size[1]} but its input image is {image.size[0]}x"
                f"{image.size[1]}; give a mask of the image's size"
            )
        else:
            out[r] = (image, mask)
    return out


def read_source_inputs(
    source: Storage, rows: dict[int, tuple[str, int, dict[str, Any]]]
) -> dict[int, tuple[InputImage, None] | str]:
    """The images of an earlier sdfleet output's rows, from their shards' tars (rows: global row
    -> (shard name, file offset, values with key, image_sha256)), each checked against the sha256
    its output recorded. One tar read per shard, stopping after its last wanted key."""
    by_tar: dict[str, dict[str, int]] = {}
    for r, (shard, _, values) in rows.items():
        by_tar.setdefault(layout.tar_file(shard), {})[values["key"]] = r
    out: dict[int, tuple[InputImage, None] | str] = {}
    for tar, keys in by_tar.items():
        found = {key: data for key, _, data in source.tar_images(tar, set(keys))}
        for key, r in keys.items():
            where = f"{source.url(tar)}#{key}"
            recorded = rows[r][2]["image_sha256"]
            if key not in found:
                out[r] = f"source image {where} is not in its tar"
                continue
            digest = hashlib.sha256(found[key]).hexdigest()
            if digest != recorded:
                out[r] = (
                    f"source image {where} has sha256 {digest[:12]}..., not the {str(recorded)[:12]}... its row records"
                )
                continue
            image = decode(found[key], "source image", where, digest, mask=False)
            out[r] = image if isinstance(image, str) else (image, None)
    return out
