"""The shard writer: one WebDataset tar, one Parquet file, and the stats file that commits them.

The stats file is written last and is the only definition of "done": a shard with a tar and no
stats is invisible to readers of sizes.json and _SUCCESS, and is simply redone.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from actors.storage import Storage
from schemas.rows import RUN_COLUMNS

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if image_format == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
    elif image_format == "png":
        # Level 1 is 2-5x faster than Pillow's default 6 on 512² images for a slightly larger file;
        # PNG is lossless either way.
        pil.save(buf, format="PNG", compress_level=1)
    else:
        # Lossy WebP at the spec's quality. Never Pillow's default lossless WebP: it takes up to
        # 1.4 s per 512² image on one core.
        pil.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata, so the same images give the same tar bytes on every retry and resume.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    def __init__(self, storage: Storage, image_format: str):
        self.storage = storage
        self.ext = EXTENSIONS[image_format]

    def write(
        self,
        name: str,
        rows: list[dict[str, Any]],
        images: dict[str, bytes],
        schema: pa.Schema,
        stats: dict,
        quarantine: dict[str, bytes] | None = None,
    ) -> None:
        """Write {name}.tar, {name}.parquet, then {name}_stats.json. rows: every planned sample.

        Images flagged under action `quarantine` go to quarantine/{name}.tar with their own
        quarantine/{name}.parquet, outside the dataset that readers of sizes.json see.
        """
        # 1. Quarantined images first: they must exist before the shard is declared done.
        if quarantine:
            held = [r for r in rows if r["key"] in quarantine]
            self._write_tar(f"quarantine/{name}.tar", held, quarantine)
            self._write_parquet(f"quarantine/{name}.parquet", held, schema)
        # 2. The tar: image, caption and row for each sample that has an image, in key order.
        self._write_tar(f"{name}.tar", rows, images)
        # 3. The Parquet: one row per planned sample, ok, filtered and failed alike.
        self._write_parquet(f"{name}.parquet", rows, schema)
        # 4. The commit marker, last.
        self.storage.write_json(f"{name}_stats.json", stats)

    def _write_tar(self, target: str, rows: list[dict[str, Any]], images: dict[str, bytes]) -> None:
        with tempfile.NamedTemporaryFile(suffix=".tar") as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for row in rows:
                    data = images.get(row["key"])
                    if data is None:
                        continue
                    key = row["key"]
                    meta = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
                    _tar_member(tar, f"{key}.{self.ext}", data)
                    _tar_member(tar, f"{key}.txt", (row["prompt"] or "").encode())
                    _tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
            spool.flush()
            self.storage.put_file(spool.name, target)

    def _write_parquet(self, target: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        table = pa.Table.from_pylist(rows, schema=schema)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        self.storage.write_bytes(target, buf.getvalue().to_pybytes())
