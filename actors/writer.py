"""The shard writer: one WebDataset tar, one Parquet file, and the stats file that commits them.

The stats file is the only definition of "done", and the data at a shard's final names is only
ever the committing writer's, even when two writers made different bytes (two GPU types, another
batch size). The protocol has the shape of Hadoop's S3A magic committer:

1. stage: each file goes up where no reader sees it: on S3 an uncompleted multipart upload to its
   final key, locally a hidden file beside its final name (fsynced, with its folder);
2. commit: the stats file is created exclusively (put-if-absent), recording what was staged: per
   file its size, sha256 and how to publish it (upload id and part ETags, or the hidden file);
3. publish: the winner completes its uploads (renames its files); a loser discards its own and
   makes sure the winner's are published.

A writer that dies between 2 and 3 leaves a commit whose files are not yet visible: whoever looks
next (a rerun, `status`, the finalizer) publishes them from what the stats file records
(`publish_committed`). Publishing is idempotent, and checks that what is visible is what the
commit names (its size; `status --verify` compares sha256). A winner that cannot publish (a folder
where its tar must go) withdraws its commit, so the shard's retry can make it again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sdfleet.actors.storage import Storage, file_sha256
from sdfleet.schemas import layout
from sdfleet.schemas.errors import StorageError, first_line
from sdfleet.schemas.json_values import row_json
from sdfleet.schemas.layout import ShardStats, StagedFile
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


@dataclass
class Encoded:
    """One image's bytes, their sha256, and the seconds each took."""

    data: bytes
    sha256: str
    seconds: dict[str, float]


def encode_timed(array: np.ndarray, image_format: str, quality: int) -> Encoded:
    """encode_image, with the bytes' sha256 and the seconds each step took."""
    t0 = time.perf_counter()
    data = encode_image(array, image_format, quality)
    t1 = time.perf_counter()
    digest = hashlib.sha256(data).hexdigest()
    return Encoded(data, digest, {"encode": t1 - t0, "hash": time.perf_counter() - t1})


def decoded_rgb(data: bytes) -> np.ndarray:
    """An encoded image as a reader of the tar decodes it: RGB pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata, so the same images give the same tar bytes on every retry and resume.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass
class Spooled:
    """A shard's files, finished on local disk and not yet anywhere else: final name -> local path."""

    folder: tempfile.TemporaryDirectory
    files: dict[str, Path]
    sha256: dict[str, str]

    def close(self) -> None:
        self.folder.cleanup()


class ShardWriter:
    def __init__(self, storage: Storage, image_format: str):
        self.storage = storage
        self.image_format = image_format

    def spool(
        self,
        name: str,
        rows: list[dict[str, Any]],
        images: dict[str, bytes],
        schema: pa.Schema,
        quarantine: dict[str, bytes] | None = None,
        embeddings: dict[str, np.ndarray] | None = None,
        embedding_size: int = 0,
    ) -> Spooled:
        """Write the shard's files to local disk: {name}.tar (only if it holds an image),
        {name}.parquet (every planned sample),
        for images flagged under action `quarantine` quarantine/{name}.tar and .parquet, outside
        the dataset that readers of sizes.json see, and with `embeddings` (key -> the image's
        embedding) the embeddings of the tar's images with their keys, in tar order. Nothing
        reaches storage until `commit`."""
        folder = tempfile.TemporaryDirectory(prefix="sdfleet-shard-")
        root = Path(folder.name)
        files: dict[str, Path] = {}
        if quarantine:
            held = [r for r in rows if r["key"] in quarantine]
            files[layout.quarantine_tar(name)] = self._tar(root / "q.tar", held, quarantine, schema)
            files[layout.quarantine_parquet(name)] = _parquet(root / "q.parquet", held, schema)
        in_tar = [r for r in rows if r["key"] in images]
        if in_tar:
            # A shard whose images were all rejected, filtered or failed has no tar: an empty one
            # breaks readers that infer the columns from the first tar (Hugging Face datasets'
            # webdataset loader). Its Parquet still holds every row, and sizes.json lists only tars.
            files[layout.tar_file(name)] = self._tar(root / "shard.tar", rows, images, schema)
        files[layout.parquet_file(name)] = _parquet(root / "shard.parquet", rows, schema)
        if embeddings is not None:
            files[layout.embeddings_file(name)] = _embeddings(
                root / "emb.npy", in_tar, embeddings, embedding_size
            )
            files[layout.embeddings_metadata_file(name)] = _parquet(
                root / "emb.parquet",
                [
                    {
                        "key": r["key"],
                        "caption": r["prompt"],
                        "prompt_id": r["prompt_id"],
                        "image_sha256": r["image_sha256"],
                    }
                    for r in in_tar
                ],
                EMBEDDINGS_METADATA_SCHEMA,
            )
        return Spooled(folder, files, {n: file_sha256(p) for n, p in files.items()})

    def commit(self, name: str, spooled: Spooled, stats: ShardStats) -> ShardStats:
        """Stage, commit and publish the spooled files. Returns the stats in effect: these, or those
        of the writer that committed first (whose files are then the ones on storage)."""
        attempt = ShardCommit(self.storage, name, spooled, stats)
        for _ in attempt.steps():
            pass
        return attempt.result

    def _tar(
        self, path: Path, rows: list[dict[str, Any]], images: dict[str, bytes], schema: pa.Schema
    ) -> Path:
        # The image, caption and row of each sample that has an image, in key order; the row's
        # values in JSON by their Arrow types (sdfleet.schemas.json_values).
        with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in rows:
                data = images.get(row["key"])
                if data is None:
                    continue
                key = row["key"]
                meta = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
                _tar_member(tar, layout.image_member(key, self.image_format), data)
                _tar_member(tar, f"{key}.txt", (row["prompt"] or "").encode())
                _tar_member(tar, f"{key}.json", row_json(meta, schema))
        return path


# clip-retrieval's metadata files carry the image's name and caption; these carry the key (the tar
# member's name and the join key into {shard}.parquet) and the prompt as caption.
EMBEDDINGS_METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("prompt_id", pa.string()),
        ("image_sha256", pa.string()),
    ]
)


def _embeddings(
    path: Path, rows: list[dict[str, Any]], embeddings: dict[str, np.ndarray], width: int
) -> Path:
    # float16, as clip-retrieval writes them: half the bytes, and cosines still good to ~1e-3. A
    # shard without images still has its (0, width) file, so readers can stack every shard's.
    matrix = np.stack([embeddings[r["key"]] for r in rows]) if rows else np.zeros((0, width))
    np.save(path, matrix.astype(np.float16))
    return path


def _parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    return path


class ShardCommit:
    """One writer's attempt to commit one shard. `steps()` does one storage step at a time and
    yields after each, so a test can interleave several writers step by step (and stop one after
    any step, as a crash would)."""

    def __init__(self, storage: Storage, name: str, spooled: Spooled, stats: ShardStats):
        self.storage = storage
        self.name = name
        self.spooled = spooled
        self.stats = stats
        self.writer_id = uuid.uuid4().hex
        self.staged: dict[str, StagedFile] = {}
        self.won: bool | None = None
        self.winner: ShardStats | None = None  # the stats of the writer that beat this one
        self.result: ShardStats | None = None

    def steps(self) -> Iterator[str]:
        """Stage each file, commit, then publish or discard each file: 2 x files + 1 steps."""
        # 1. Stage every file where no reader sees it.
        t0 = time.perf_counter()
        for final, path in self.spooled.files.items():
            self.staged[final] = self.storage.stage(
                path,
                final,
                self.writer_id,
                layout.content_type(final),
                sha256=self.spooled.sha256[final],
            )
            yield f"stage {final}"
        # 2. Commit: the stats file, created exclusively, records what was staged. The shard is
        #    finished now: every output is on storage, if not yet visible.
        now = time.time()
        record = self.stats.model_copy(
            update={
                "writer_id": self.writer_id,
                "files": self.staged,
                "finished_ts": round(now, 3),
                "stage_seconds": {
                    **self.stats.stage_seconds,
                    "upload": round(time.perf_counter() - t0, 4),
                },
                "finished_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
                "wall_seconds": round(now - self.stats.started_ts, 4),
            }
        )
        self.won = self._create_stats(record)
        yield "commit"
        # 3. Publish (the winner), or discard and make sure the winner's files are published.
        if self.won:
            self.result = record
            for final, staged in self.staged.items():
                try:
                    self.storage.publish(final, staged)
                except Exception:
                    self._withdraw()
                    raise
                yield f"publish {final}"
            return
        for i, (final, staged) in enumerate(self.staged.items()):
            self.storage.discard(final, staged)
            if i == len(self.staged) - 1:  # as many steps as a winner: tests interleave by count
                self.result = self._adopt_winner()
            yield f"discard {final}"

    def _create_stats(self, record: ShardStats) -> bool:
        """Create the stats file exclusively; whether this writer won. A refusal is not proof of a
        lost race: a create whose answer was lost and that the client sent again is refused by
        itself (S3's 412 after a dropped response, EEXIST from a retransmitted NFS link). So the
        stats file decides: this writer's id means it won, another writer's of this job means it
        lost, and another job's is an error naming the file."""
        stats_name = layout.stats_file(self.name)
        try:
            self.storage.write_json(stats_name, record.model_dump(mode="json"), exclusive=True)
            return True
        except FileExistsError:
            pass
        found = read_stats(self.storage, stats_name)
        if found.fingerprint != record.fingerprint:
            for final, staged in self.staged.items():
                self.storage.discard(final, staged)
            raise ForeignCommit(self.storage, stats_name, found, record.fingerprint)
        if found.writer_id == self.writer_id:
            log.info("shard %s: the commit was refused as a repeat of its own; it won", self.name)
            return True
        self.winner = found
        return False

    def _withdraw(self) -> None:
        """A commit whose files cannot be made visible (say, a folder where the tar must go) is
        taken back, so the shard is not done and its retry can make it again. Best effort: if even
        that fails, the next reader's roll-forward tries the publish again."""
        try:
            self.storage.delete(layout.stats_file(self.name))
            for final, staged in self.staged.items():
                self.storage.discard(final, staged)
            log.warning(
                "shard %s: its files could not be published; withdrew its commit", self.name
            )
        except Exception as e:  # noqa: BLE001 -- the publish error is the one to report
            log.warning("shard %s: could not withdraw its commit either: %s", self.name, e)

    def _adopt_winner(self) -> ShardStats:
        winner = self.winner
        publish_committed(self.storage, winner)
        log.warning(
            "shard %s was already committed by %s; discarded this attempt's files",
            self.name,
            winner.worker_id,
        )
        return winner


class ForeignCommit(StorageError):
    """A shard's stats file written by another job (another fingerprint) in this job's output."""

    def __init__(self, storage: Storage, stats_name: str, found: ShardStats, fingerprint: str):
        super().__init__(
            f"{storage.url(stats_name)} commits shard {found.shard} for another job (fingerprint "
            f"{found.fingerprint}; this job's is {fingerprint}): it is not this job's output. "
            "Remove that file, or write to a new output.uri"
        )


class UnpublishableCommit(StorageError):
    """A committed shard whose files are not all visible and whose staged files are gone (aborted
    or expired uploads): its commit can never be rolled forward, only withdrawn."""

    def __init__(self, storage: Storage, stats: ShardStats, problem: str):
        # What is wrong, for lists that name the command once for all their shards (status, the
        # finalizer); the message adds the command for this one shard.
        self.short = (
            f"{problem}, and the staged file its commit names is gone (aborted or expired), so it "
            "can never be published"
        )
        super().__init__(
            f"shard {stats.shard} is committed ({storage.url(layout.stats_file(stats.shard))}) but "
            f"{self.short}; run `{withdraw_command(storage, [stats.shard])}`, then rerun to make "
            "the shard again"
        )


def withdraw_command(storage: Storage, shards: list[str]) -> str:
    """The one command that clears unpublishable commits (`sdfleet withdraw`)."""
    return f"sdfleet withdraw {storage.url()} {' '.join(shards)}"


def read_stats(storage: Storage, name: str) -> ShardStats:
    """A stats file, parsed; a StorageError naming it if it is not one."""
    try:
        return ShardStats.model_validate_json(storage.read_bytes(name))
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise StorageError(
            f"{storage.url(name)} is not a valid shard stats record ({first_line(e)})"
        ) from None


def publish_committed(storage: Storage, stats: ShardStats) -> None:
    """Make a committed shard's files visible, as its stats record them (idempotent), and check
    that what is visible is what the commit names. A file already visible costs one look, not a
    second completion of its upload. A file neither visible nor still staged raises
    UnpublishableCommit, which says how to clear it. A commit made before this protocol records
    no files: there is nothing to publish."""
    for final, staged in stats.files.items():
        if storage.published_problem(final, staged) is None:
            continue
        if not storage.is_staged(final, staged):
            # Another reader may have published it between the two looks.
            problem = storage.published_problem(final, staged)
            if problem is None:
                continue
            raise UnpublishableCommit(storage, stats, problem)
        storage.publish(final, staged)


def committed_file_problems(storage: Storage, stats: ShardStats, deep: bool = False) -> list[str]:
    """What is wrong with a committed shard's files on storage: missing, another size, or with
    deep=True other bytes (sha256). Empty when all is well."""
    problems = []
    for final, staged in stats.files.items():
        try:
            problem = storage.published_problem(final, staged, deep=deep)
        except StorageError as e:
            problem = str(e)
        if problem:
            problems.append(problem)
    return problems
