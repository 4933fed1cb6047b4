"""The shard writer: one WebDataset tar, one Parquet file, and the stats file that commits them.

The stats file is written last and is the only definition of "done": a shard with a tar and no
stats is invisible to readers of sizes.json and _SUCCESS, and is simply redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdfleet.actors.storage import Storage
from sdfleet.schemas import layout
from sdfleet.schemas.layout import ShardStats
from sdfleet.schemas.rows import RUN_COLUMNS

log = logging.getLogger("sdfleet")


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
        self.image_format = image_format

    def write_outputs(
        self,
        name: str,
        rows: list[dict[str, Any]],
        images: dict[str, bytes],
        schema: pa.Schema,
        quarantine: dict[str, bytes] | None = None,
    ) -> dict[str, str]:
        """Write {name}.tar and {name}.parquet (rows: every planned sample); return their sha256s.

        Images flagged under action `quarantine` go to quarantine/{name}.tar with their own
        quarantine/{name}.parquet, outside the dataset that readers of sizes.json see.
        Nothing is done until `commit`.
        """
        # 1. Quarantined images first: they must exist before the shard is declared done.
        if quarantine:
            held = [r for r in rows if r["key"] in quarantine]
            self._write_tar(layout.quarantine_tar(name), held, quarantine)
            self._write_parquet(layout.quarantine_parquet(name), held, schema)
        # 2. The tar: image, caption and row for each sample that has an image, in key order.
        # 3. The Parquet: one row per planned sample, ok, filtered and failed alike.
        return {"tar_sha256": self._write_tar(layout.tar_file(name), rows, images),
                "parquet_sha256": self._write_parquet(layout.parquet_file(name), rows, schema)}

    def commit(self, name: str, stats: ShardStats) -> ShardStats:
        """Create {name}_stats.json, the commit marker, or reconcile with the writer that beat us to it.
        Returns the stats in effect: these, or those of a writer that committed first.

        A slow worker presumed dead can finish a shard that its replacement also finished. The tars
        are byte-identical (deterministic content); the Parquets differ only in run columns. Exactly
        one stats file is created; if the Parquet on storage is no longer the one those stats
        describe (we overwrote it after they were written), our stats, which describe it, replace them.
        """
        target = layout.stats_file(name)
        try:
            self.storage.write_json(target, stats.model_dump(mode="json"), exclusive=True)
            return stats
        except FileExistsError:
            pass
        winner = ShardStats.model_validate(self.storage.read_json(target))
        on_storage = hashlib.sha256(self.storage.read_bytes(layout.parquet_file(name))).hexdigest()
        if on_storage == winner.parquet_sha256:
            log.warning("shard %s was already committed by %s; keeping that commit", name, winner.worker_id)
            return winner
        if on_storage != stats.parquet_sha256:
            raise RuntimeError(f"shard {name}: {self.storage.url(layout.parquet_file(name))} matches neither commit; "
                               "a third writer is active. Retrying the shard resolves it.")
        log.warning("shard %s: re-committing so the stats describe the Parquet on storage", name)
        self.storage.write_json(target, stats.model_dump(mode="json"))
        return stats

    def _write_tar(self, target: str, rows: list[dict[str, Any]], images: dict[str, bytes]) -> str:
        with tempfile.NamedTemporaryFile(suffix=".tar") as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for row in rows:
                    data = images.get(row["key"])
                    if data is None:
                        continue
                    key = row["key"]
                    meta = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
                    _tar_member(tar, layout.image_member(key, self.image_format), data)
                    _tar_member(tar, f"{key}.txt", (row["prompt"] or "").encode())
                    _tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
            spool.flush()
            self.storage.put_file(spool.name, target)
            spool.seek(0)
            return hashlib.file_digest(spool, "sha256").hexdigest()

    def _write_parquet(self, target: str, rows: list[dict[str, Any]], schema: pa.Schema) -> str:
        table = pa.Table.from_pylist(rows, schema=schema)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue().to_pybytes()
        self.storage.write_bytes(target, data)
        return hashlib.sha256(data).hexdigest()
