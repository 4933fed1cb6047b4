"""Reading an output folder: the one reader that `status`, `preview`, `score` and the finalizer share.

It reads what a committed shard holds and nothing else: a shard counts once its stats file
exists and carries the job's fingerprint (`Survey`). Rows come from its Parquet; images are
streamed from its tar by key, stopping as soon as the wanted keys are seen (members are in key
order), so a preview of the first samples reads the start of the first tars only.
"""

from __future__ import annotations

import io
import logging
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from sdfleet.actors.storage import Storage, json_bytes
from sdfleet.schemas import layout
from sdfleet.schemas.errors import StorageError, UserError, first_line
from sdfleet.schemas.layout import FailedShard, JobTotals, ShardStats, UncommittedSpend
from sdfleet.schemas.rows import (
    STATUS_DUPLICATE,
    STATUS_FILTERED,
    STATUS_OK,
    STATUS_REJECTED,
    STATUS_SKIPPED,
)
from sdfleet.schemas.samples import shard_name

log = logging.getLogger("sdfleet")

# The statuses curation adds, as `curation_counts` lists them.
CURATION_STATUSES = (STATUS_REJECTED, STATUS_DUPLICATE, STATUS_SKIPPED)

# Records read per batch of concurrent GETs: bounds the bytes held at once (100k Parquet footers
# at once peaked at 1.8 GB).
READ_BATCH = 1000
# A survey that had to read this many stats files writes a new index, so that the next one does not.
INDEX_AFTER_READS = 500
INDEX_SCHEMA = pa.schema([("name", pa.string()), ("tag", pa.string()), ("content", pa.binary())])


# What every job record holds that readers rely on.
_JOB_KEYS = ("spec", "fingerprint", "num_shards", "num_samples", "key_width")


def missing_job_keys(record: Any) -> list[str]:
    """The keys every sdfleet job record holds that `record` lacks (all of them if it is not even
    a JSON object): empty for a job record."""
    return (
        [k for k in _JOB_KEYS if k not in record] if isinstance(record, dict) else list(_JOB_KEYS)
    )


class NotAnOutput(UserError, FileNotFoundError):
    """The URI holds no job record: not an sdfleet output, or a job that never started."""


class NameTaken(UserError, FileExistsError):
    """A tool's file (`sdfleet score --out NAME`, `sdfleet dedup --out NAME`) already exists in
    the output: tools add files to an output, they never replace one."""

    def __init__(self, storage: Storage, name: str, out: str):
        super().__init__(
            f"{storage.url(name)} exists: pass --out with another name (e.g. --out {out}-2) to "
            "keep it, or delete it first"
        )


def check_names_free(storage: Storage, files: Iterable[str], out: str) -> None:
    """Before a tool computes anything: none of the files it will write under --out `out` exists."""
    for name in files:
        if storage.exists(name):
            raise NameTaken(storage, name, out)


def create_tool_file(storage: Storage, name: str, data: bytes, out: str) -> None:
    """Write a tool's file, which must not exist yet (a run beside this one may have made it
    since `check_names_free`)."""
    try:
        storage.write_bytes(name, data, exclusive=True)
    except FileExistsError:
        raise NameTaken(storage, name, out) from None


@dataclass
class Survey:
    """Every planned shard of one job, classified as committed, quarantined or pending."""

    num_shards: int
    num_samples: int
    committed: dict[str, ShardStats] = field(default_factory=dict)  # shard name -> its stats
    quarantined: dict[str, FailedShard] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    listing: dict[str, int] = field(
        default_factory=dict
    )  # every file of the output -> its size, when surveyed

    @property
    def committed_samples(self) -> int:
        return sum(s.samples for s in self.committed.values())

    @property
    def complete(self) -> bool:
        return (
            not self.pending and not self.quarantined and self.committed_samples == self.num_samples
        )

    def totals(self) -> JobTotals:
        """Counts and times summed over the committed shards, for status, the card and budgets."""
        return JobTotals.add_up(self.committed.values())


def curation_counts(totals: JobTotals) -> str:
    """', 3 rejected, 1 duplicate, 8 skipped' where curation made any, else ''."""
    counts = [f"{n} {status}" for status in CURATION_STATUSES if (n := totals.count(status))]
    return "".join(", " + c for c in counts)


class OutputReader:
    """One output (local folder or object-store prefix), read lazily and cached per shard."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._job: dict[str, Any] | None = None
        self._survey: Survey | None = None
        self._remembered: dict[str, tuple[str, bytes]] = {}  # stats name -> (content tag, bytes)
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._quarantined: set[str] | None = None

    @classmethod
    def open(cls, uri: str, storage_options: dict[str, Any] | None = None) -> OutputReader:
        return cls(Storage(uri, storage_options))

    # ------------------------------------------------------------------ the job and its shards

    @property
    def job(self) -> dict[str, Any]:
        """The job record (`_job.json`); NotAnOutput if there is none."""
        if self._job is None:
            try:
                self._job = self.storage.read_json(layout.JOB_FILE)
            except FileNotFoundError:
                if not self.storage.exists(""):
                    raise NotAnOutput(f"{self.storage.url()} does not exist") from None
                raise NotAnOutput(
                    f"{self.storage.url()} has no {layout.JOB_FILE}: it is not an sdfleet output "
                    "(or its job never started)"
                ) from None
            missing = missing_job_keys(self._job)
            if missing:
                self._job = None
                raise NotAnOutput(
                    f"{self.storage.url(layout.JOB_FILE)} is not an sdfleet job record (no "
                    f"{', '.join(missing)})"
                )
        return self._job

    @property
    def name(self) -> str:
        return str(
            self.job["spec"].get("name") or self.storage.url().rstrip("/").rsplit("/", 1)[-1]
        )

    def uncommitted_spend(self) -> UncommittedSpend:
        """What this job's attempts that committed nothing used of the GPUs (`_spent.json`); none
        where the file is absent or belongs to another job."""
        empty = UncommittedSpend(fingerprint=self.job["fingerprint"])
        try:
            found = UncommittedSpend.model_validate(self.storage.read_json(layout.SPENT_FILE))
        except FileNotFoundError:
            return empty
        except (ValueError, ValidationError) as e:  # not JSON, or not ours: said, not fatal
            log.warning("ignoring %s: %s", self.storage.url(layout.SPENT_FILE), first_line(e))
            return empty
        return found if found.fingerprint == empty.fingerprint else empty

    def survey(self, refresh: bool = False) -> Survey:
        """Classify every planned shard from the records alone, never the data.

        1. One listing of the output, with each file's tag (ETag on S3; mtime and inode locally).
        2. The stats records whose content is known already at the tag the listing shows: from the
           index (`_index/`, a cache of stats files), or handed over by the driver (`remember`).
        3. The other records, read many at a time (concurrent GETs on an object store).
        4. After reading many, a new index file replaces the ones read: the next survey of a 100k-
           shard output reads a few files, not 100k (each GET costs the client ~7 ms of CPU).
        """
        if self._survey is not None and not refresh:
            return self._survey
        job = self.job
        names = [shard_name(i, job["key_width"]) for i in range(job["num_shards"])]
        tagged = self.storage.tagged_listing()
        listing = {name: size for name, (size, _) in tagged.items()}
        out = Survey(num_shards=job["num_shards"], num_samples=job["num_samples"], listing=listing)
        wanted = [layout.stats_file(n) for n in names if layout.stats_file(n) in tagged]
        # 2. Known records: the index's rows whose tag is the listing's, then the remembered ones.
        index_files = sorted(n for n in tagged if layout.is_index_file(n))
        index = self._read_index(index_files)
        index_names, tags = index.column("name").to_pylist(), index.column("tag").to_pylist()
        rows = {name: i for i, name in enumerate(index_names)}  # a later file's row wins
        valid = [rows[n] for n in wanted if n in rows and tags[rows[n]] == tagged[n][1]]
        content, stats = index.column("content"), {}
        for i in list(valid):
            try:
                stats[index_names[i]] = ShardStats.model_validate_json(content[i].as_py())
            except (ValueError, ValidationError):  # a damaged entry: the file itself is read below
                valid.remove(i)
        fresh = {
            n: data
            for n, (tag, data) in self._remembered.items()
            if n not in stats and n in tagged and tagged[n][1] == tag
        }
        # 3. The rest, read.
        fresh.update(self._read_texts([n for n in wanted if n not in stats and n not in fresh]))
        stats.update((n, self._parse(ShardStats, n, data)) for n, data in fresh.items())
        failed = {
            n: self._parse(FailedShard, n, text)
            for n, text in self._read_texts(
                [layout.failed_file(n) for n in names if layout.failed_file(n) in tagged]
            ).items()
        }
        for name in names:
            record = stats.get(layout.stats_file(name))
            if record is not None and record.fingerprint == job["fingerprint"]:
                out.committed[name] = record
                continue
            record = failed.get(layout.failed_file(name))
            if (
                record is not None and record.fingerprint == job["fingerprint"]
            ):  # not a replaced job's
                out.quarantined[name] = record
            else:
                out.pending.append(name)
        # 4. A new index: the still valid rows of the old ones, and what was not in them.
        if len(fresh) >= INDEX_AFTER_READS:
            names_fresh = sorted(fresh)
            new_rows = pa.table(
                {
                    "name": names_fresh,
                    "tag": [tagged[n][1] for n in names_fresh],
                    "content": pa.array([fresh[n] for n in names_fresh], pa.binary()),
                }
            )
            self._write_index(
                pa.concat_tables([index.take(pa.array(valid, pa.int64())), new_rows]), index_files
            )
        self._survey = out
        return out

    def remember(self, records) -> None:
        """Stats this process already holds (the driver gets each shard's from its worker): a survey
        takes them in place of a read where the listing's tag is their content's (S3)."""
        for stats in records:
            data = json_bytes(stats.model_dump(mode="json"))
            tag = self.storage.content_tag(data)
            if tag is not None:
                self._remembered[layout.stats_file(stats.shard)] = (tag, data)

    def _read_texts(self, names: list[str]) -> dict[str, bytes]:
        """name -> bytes of each file, read READ_BATCH at a time; a file gone since the listing
        (a withdrawn commit) is left out."""
        out = {}
        for i in range(0, len(names), READ_BATCH):
            for name, data in self.storage.read_many(names[i : i + READ_BATCH]).items():
                if isinstance(data, FileNotFoundError):
                    continue
                if isinstance(data, Exception):
                    with self.storage.errors(name, "read"):
                        raise data
                out[name] = data
        return out

    def _parse(self, model, name: str, data: bytes):
        try:
            return model.model_validate_json(data)
        except (ValueError, ValidationError) as e:
            raise StorageError(
                f"{self.storage.url(name)} is not a valid {model.__name__} record ({e}); "
                "it was not written by this version of sdfleet"
            ) from None

    def _read_index(self, index_files: list[str]) -> pa.Table:
        """The rows (name, tag, content) of every index file, in file order. An index file that does
        not read is skipped: the index only ever saves reads."""
        tables = []
        for name in index_files:
            try:
                tables.append(
                    pq.read_table(io.BytesIO(self.storage.read_bytes(name)))
                    .select(list(INDEX_SCHEMA.names))
                    .cast(INDEX_SCHEMA)
                )
            except Exception as e:  # noqa: BLE001
                log.info("ignoring %s: %s", self.storage.url(name), e)
        return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()

    def _write_index(self, table: pa.Table, replaces: list[str]) -> None:
        """Best effort: a reader without write access (status with read-only credentials) reads
        the records each time instead."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        try:
            self.storage.write_bytes(
                layout.index_file(f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"), buf.getvalue()
            )
            for old in replaces:
                self.storage.delete(old)
        except Exception as e:  # noqa: BLE001
            log.info(
                "could not write the stats index in %s: %s",
                self.storage.url(layout.INDEX_DIR),
                first_line(e),
            )

    def verify(self, deep: bool = False) -> dict[str, list[str]]:
        """What differs, per committed shard, between its files on storage and its stats; empty when
        all is well. A commit whose writer died before publishing its files is published first
        (that is how such a crash is rolled forward). Checks sizes from the survey's listing of
        the output; deep=True also reads every file and compares its sha256."""
        from sdfleet.actors.writer import (
            UnpublishableCommit,
            committed_file_problems,
            publish_committed,
        )

        survey = self.survey()
        listing = survey.listing
        problems: dict[str, list[str]] = {}
        for name, stats in survey.committed.items():
            found = [
                p
                for f, staged in stats.files.items()
                if (p := self.storage.visible_problem(f, staged, listing.get(f)))
            ]
            if found:
                try:
                    publish_committed(self.storage, stats)
                    found = []
                except UnpublishableCommit as e:
                    found = [e.short]
                except OSError as e:  # StorageError, and a store's own (a 500): one line, named
                    found = [first_line(e)]
            if deep and not found:
                found = committed_file_problems(self.storage, stats, deep=True)
            if found:
                problems[name] = found
        return problems

    @property
    def shards(self) -> list[str]:
        """The committed shards, in key order: the only ones a reader sees."""
        return sorted(self.survey().committed)

    # ------------------------------------------------------------------ rows

    def rows(self, shard: str) -> list[dict[str, Any]]:
        """The shard's Parquet rows in key order; `_shard` names the shard."""
        if shard not in self._rows:
            table = pq.read_table(io.BytesIO(self.storage.read_bytes(layout.parquet_file(shard))))
            rows = sorted(table.to_pylist(), key=lambda r: r["key"])
            for r in rows:
                r["_shard"] = shard
            self._rows[shard] = rows
        return self._rows[shard]

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            yield from self.rows(shard)

    def parquet_rows(self, shards: list[str]) -> dict[str, int]:
        """Rows in each shard's Parquet, from its footer alone: the files' ends, read many at a time."""
        sizes = {
            layout.parquet_file(s): st.files[layout.parquet_file(s)].size if st.files else None
            for s, st in ((s, self.survey().committed[s]) for s in shards)
        }
        listed = self.survey().listing
        sizes = {n: listed.get(n, size) for n, size in sizes.items()}
        missing = [n for n, size in sizes.items() if size is None]
        if missing:
            raise StorageError(f"{self.storage.url(missing[0])} is missing")
        out = {}
        for i in range(0, len(shards), READ_BATCH):
            out.update(self._rows_from_footers(shards[i : i + READ_BATCH], sizes))
        return out

    def _rows_from_footers(self, shards: list[str], sizes: dict[str, int]) -> dict[str, int]:
        names = [layout.parquet_file(s) for s in shards]
        tails = self.storage.read_many(names, tails={n: sizes[n] for n in names})
        out = {}
        for shard in shards:
            name = layout.parquet_file(shard)
            tail = tails[name]
            if isinstance(tail, Exception):
                with self.storage.errors(name, "read"):
                    raise tail
            try:
                out[shard] = _footer(tail, sizes[name]).num_rows
            except (ValueError, pa.ArrowInvalid) as e:
                raise StorageError(
                    f"{self.storage.url(name)} is not a readable Parquet file: {e}"
                ) from None
            except _FooterBeyondTail:
                with (
                    self.storage.errors(name, "read"),
                    self.storage.fs.open(self.storage.path(name), "rb") as fh,
                ):
                    out[shard] = pq.ParquetFile(fh).metadata.num_rows
        return out

    @property
    def quarantined_keys(self) -> set[str]:
        """Keys whose image is held in quarantine/ (safety.action=quarantine)."""
        if self._quarantined is None:
            keys: set[str] = set()
            for shard in self.shards:
                if self.storage.exists(layout.quarantine_parquet(shard)):
                    data = self.storage.read_bytes(layout.quarantine_parquet(shard))
                    keys.update(
                        pq.read_table(io.BytesIO(data), columns=["key"]).column("key").to_pylist()
                    )
            self._quarantined = keys
        return self._quarantined

    # ------------------------------------------------------------------ images

    def has_image(self, row: dict[str, Any], show_filtered: bool = False) -> bool:
        """Whether the row's image is in a tar: ok rows, and with show_filtered quarantined ones."""
        if row["status"] == STATUS_OK:
            return True
        return (
            show_filtered
            and row["status"] == STATUS_FILTERED
            and row["key"] in self.quarantined_keys
        )

    def images(self, rows: Iterable[dict[str, Any]]) -> dict[str, tuple[str, bytes]]:
        """{key: (extension, encoded bytes)} for the given rows, from their shard's main tar, or its
        quarantine tar for filtered rows. Keys whose image is missing are left out."""
        by_tar: dict[str, set[str]] = {}
        for r in rows:
            name = (
                layout.quarantine_tar(r["_shard"])
                if r["status"] == STATUS_FILTERED
                else layout.tar_file(r["_shard"])
            )
            by_tar.setdefault(name, set()).add(r["key"])
        found: dict[str, tuple[str, bytes]] = {}
        for name, keys in sorted(by_tar.items()):
            try:
                found.update(
                    (key, (ext, data)) for key, ext, data in self.stream_images(name, keys)
                )
            except (StorageError, tarfile.TarError) as e:
                log.warning(
                    "%s is unreadable (%s); its images are left out", self.storage.url(name), e
                )
        return found

    def stream_images(
        self, tar_name: str, keys: set[str] | None = None
    ) -> Iterator[tuple[str, str, bytes]]:
        """(key, extension, encoded bytes) of each image in one of this output's tars (Storage.tar_images)."""
        return self.storage.tar_images(tar_name, keys)


class _FooterBeyondTail(Exception):
    """The Parquet footer is larger than the tail that was read."""


def _footer(tail: bytes, size: int):
    """A Parquet file's metadata from its last bytes (`tail`; the file has `size` bytes)."""
    import struct

    if len(tail) < 8 or tail[-4:] != b"PAR1":
        raise ValueError("no PAR1 at its end")
    (length,) = struct.unpack("<I", tail[-8:-4])
    if length + 8 > len(tail):
        if len(tail) == size:
            raise ValueError("its footer is longer than the file")
        raise _FooterBeyondTail
    return pq.read_metadata(pa.BufferReader(tail[-(length + 8) :]))
