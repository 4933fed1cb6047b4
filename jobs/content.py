"""The driver's side of `sdfleet.schemas.content`: resolve, once per run, what the job's input
files, the image and mask files its rows point at, and its checkpoint are, by content.

- an input file on an object store: its ETag; a local one: its size, its mtime (in ns) and a hash
  of its Parquet footer (row groups, offsets and statistics), read with the footer planning reads;
- image and mask URIs (the image tasks' string columns): a hash of each named file's listing
  entry (ETag, or size, mtime and inode), from one listing of the input's folder;
- the checkpoint: `sdfleet.actors.model_content.model_content`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from sdfleet.actors.inputs import InputImageReader
from sdfleet.actors.model_content import model_content
from sdfleet.actors.storage import Storage
from sdfleet.schemas.content import JobContent, checkpoints_of
from sdfleet.schemas.plan import Plan
from sdfleet.schemas.tasks import TASKS

# The Parquet file's last 8 bytes: the footer's length (4 bytes, little-endian), then "PAR1".
_FOOTER_TAIL = 8
# Rows of an image column read at a time when listing the files rows point at.
_URI_BATCH_ROWS = 65536


def input_file_identity(storage: Storage, fh: BinaryIO, size: int) -> str:
    """An input file's content identity (see the module's docstring); `fh` is open on it."""
    if not storage.local:
        info = storage.fs.info(storage.root)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if etag:
            return f"etag:{etag}"
        return f"size:{size}:mtime:{info.get('LastModified') or info.get('mtime')}"
    fh.seek(size - _FOOTER_TAIL)
    length = int.from_bytes(fh.read(4), "little")
    fh.seek(size - _FOOTER_TAIL - length)
    footer = hashlib.sha256(fh.read(length)).hexdigest()
    mtime_ns = os.stat(storage.root).st_mtime_ns
    return f"size:{size}:mtime_ns:{mtime_ns}:footer:{footer[:16]}"


def resolve_content(plan: Plan) -> JobContent:
    """The plan's content identities: its input files' (planning read them), the files its rows
    point at, and those of its checkpoints (the main one, a refiner, a VAE override)."""
    model = plan.spec.model
    images, count = referenced_images_digest(plan)
    return JobContent(
        input_files={f.uri: f.content for f in plan.files},
        input_images=images,
        input_image_files=count,
        models={
            key: model_content(source, revision, model.storage_options)
            for key, (source, revision) in checkpoints_of(model).items()
        },
    )


def referenced_images_digest(plan: Plan) -> tuple[str | None, int]:
    """A hash over the image and mask files the input rows name (each name with its listing entry,
    "missing" where there is none), and how many; (None, 0) where rows name no file."""
    inp = plan.spec.input
    if not TASKS[plan.spec.model.task].image or plan.source_output or not inp.image_column:
        return None, 0
    reader = InputImageReader(inp.uri, inp.storage_options)
    names = set()
    for f in plan.files:
        for column, what in ((inp.image_column, "input image"), (inp.mask_column, "mask")):
            if column is not None:
                names |= _named_files(reader, f.uri, column, what, inp.storage_options)
    if not names:
        return None, 0
    listing = reader.storage.tagged_listing()
    digest = hashlib.sha256()
    for name in sorted(names):
        size, tag = listing.get(name, (-1, "missing"))
        digest.update(f"{name}\0{size}\0{tag}\n".encode())
    return digest.hexdigest(), len(names)


def _named_files(
    reader: InputImageReader, uri: str, column: str, what: str, options: dict[str, Any]
) -> set[str]:
    """The names inside the input's folder that a string column's cells point at (a binary
    column holds the images themselves, which the file's own identity covers)."""
    storage = Storage(uri, options)
    names = set()
    with storage.errors("", "read"), storage.fs.open(storage.root, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        if parquet.schema_arrow.field(column).type not in (pa.string(), pa.large_string()):
            return names
        for batch in parquet.iter_batches(batch_size=_URI_BATCH_ROWS, columns=[column]):
            for value in batch.column(0).to_pylist():
                cell = reader.resolve(value, what)
                if cell.name is not None:
                    names.add(cell.name)
    return names
