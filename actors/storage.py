"""All file IO goes through here, over fsspec, so local paths and s3:// share one code path.

S3 endpoints and credentials come from the standard AWS environment (AWS_ENDPOINT_URL included,
which botocore reads itself) unless a spec's `storage_options` overrides them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sdfleet.actors.storage_errors import check_endpoint_reachable, endpoint_of, storage_error
from sdfleet.schemas.errors import StorageError
from sdfleet.schemas.locations import is_remote

if TYPE_CHECKING:  # pydantic, which the engine's users on a bare GPU machine may lack, loads lazily
    from sdfleet.schemas.layout import StagedFile

log = logging.getLogger("sdfleet")


# Part size of staged uploads. S3's minimum is 5 MiB (but for the last part) and its maximum 10,000
# parts: 64 MiB parts allow 640 GB files, and a 1,000-image JPEG shard (~100 MB) is two parts.
STAGE_PART_BYTES = 64 << 20

# What `read_many(tails=...)` reads of each file: a Parquet footer of a 10,000-row shard with its
# column statistics is a few tens of KB; a larger one is read again whole by the caller.
TAIL_BYTES = 256 << 10

# botocore's "standard" mode retries throttling and 500/502/503/504 with capped exponential backoff
# and jitter. Ten attempts ride out a minute-long S3 brown-out; 403 and 404 are never retried, so a
# wrong bucket or missing permission fails at once.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def _no_such_upload(e: BaseException) -> bool:
    """An upload already completed or aborted. s3fs passes botocore's NoSuchUpload on as a
    FileNotFoundError with its message only, the NoSuchUpload as its cause."""
    seen: BaseException | None = e
    while seen is not None:
        if "NoSuchUpload" in f"{type(seen).__name__} {seen}":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives an object completed from these parts: md5 of the parts' md5s, and their count."""
    digest = hashlib.md5(b"".join(bytes.fromhex(e) for e in part_etags), usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(part_etags)}"


def _fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(obj: Any) -> bytes:
    """A JSON record as sdfleet writes it: sorted keys, indented, one trailing newline (so the same
    record is always the same bytes, and has the same content tag)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode() + b"\n"


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Storage:
    """One folder (local or object-store prefix). Every write is atomic: readers see a whole file or none."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = (
            uri.rstrip("/") if is_remote(uri) else str(Path(uri.removeprefix("file://")).absolute())
        )
        options = dict(storage_options or {})
        if self.uri.startswith(("s3://", "s3a://")):
            options.setdefault("config_kwargs", {}).setdefault("retries", S3_RETRIES)
            check_endpoint_reachable(self.uri, endpoint_of(options))
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **options)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def __reduce__(self):
        # fsspec filesystems pickle, but carry caches; rebuild from the URI on the worker instead.
        return (Storage, (self.uri, self.fs.storage_options))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def url(self, name: str = "") -> str:
        return f"{self.uri}/{name}" if name else self.uri

    # ------------------------------------------------------------------ reads

    def exists(self, name: str) -> bool:
        with self.errors(name, "check"):
            return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        with self.errors(name, "read"):
            return self.fs.cat_file(self.path(name))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_many(
        self, names: list[str], tails: dict[str, int] | None = None
    ) -> dict[str, bytes | Exception]:
        """Several files' bytes at once: from an object store concurrently (one GET each, many in
        flight), from a local folder in turn. A file that cannot be read maps to its error, so one
        bad file is reported by name. tails: name -> file size; read only the last TAIL_BYTES of
        each (a Parquet footer), from its size as listed."""
        if not names:
            return {}
        ranges = (
            {n: (max(0, tails[n] - TAIL_BYTES), tails[n]) for n in names}
            if tails is not None
            else {}
        )
        if self.local:
            out: dict[str, bytes | Exception] = {}
            for n in names:
                try:
                    with open(self.path(n), "rb") as f:
                        if ranges:
                            f.seek(ranges[n][0])
                        out[n] = f.read()
                except OSError as e:
                    out[n] = e
            return out
        paths = [self.path(n) for n in names]
        with self.errors("", "read"):
            if ranges:
                found = self.fs.cat_ranges(
                    paths,
                    [ranges[n][0] for n in names],
                    [ranges[n][1] for n in names],
                    on_error="return",
                )
                return dict(zip(names, found))
            found = self.fs.cat(paths, on_error="return")
        return {n: found.get(p, FileNotFoundError(p)) for n, p in zip(names, paths)}

    def tar_images(
        self, tar_name: str, keys: set[str] | None = None
    ) -> Iterator[tuple[str, str, bytes]]:
        """(key, extension, encoded bytes) of each image in an sdfleet tar, in tar order; only `keys`
        when given, and then reading stops at the first member past the last of them. Member
        names are only ever keys here, never paths."""
        import tarfile

        from sdfleet.schemas import layout

        if keys is not None and not keys:
            return
        last = max(keys) if keys else None
        left = set(keys) if keys is not None else None
        # Remote: modest read-ahead blocks, so stopping early really does read only the start.
        options = {} if self.local else {"block_size": 4 << 20, "cache_type": "readahead"}
        with (
            self.errors(tar_name, "read"),
            self.fs.open(self.path(tar_name), "rb", **options) as f,
            tarfile.open(fileobj=f, mode="r|") as tar,
        ):
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if left is not None and last is not None and len(key) == len(last) and key > last:
                    return  # members are in key order: the rest are past what we want
                if ext.lower() not in layout.MIME_TYPES or (left is not None and key not in left):
                    continue
                yield key, ext.lower(), tar.extractfile(member).read()
                if left is not None:
                    left.discard(key)
                    if not left:
                        return

    def list(self, pattern: str) -> list[str]:
        """Names (relative to this folder) matching a glob, sorted."""
        self.fs.invalidate_cache()
        with self.errors(pattern, "list"):
            found = self.fs.glob(self.path(pattern))
        prefix = self.root + "/"
        return sorted(
            p[len(prefix) :] if p.startswith(prefix) else p.rsplit("/", 1)[-1] for p in found
        )

    def listing(self) -> dict[str, int]:
        """Every file below this folder: relative name -> size, in one listing (paginated on S3)
        rather than a request per file."""
        return {name: size for name, (size, _) in self.tagged_listing().items()}

    def tagged_listing(self) -> dict[str, tuple[int, str]]:
        """Every file below this folder: relative name -> (size, tag), in one listing. A tag changes
        whenever the file is written: its ETag on S3 (the MD5 of its bytes for a plain PUT), its
        modification time and inode locally."""
        if self.local:
            return self._local_listing()
        self.fs.invalidate_cache()
        prefix = self.root + "/"
        with self.errors("", "list"):
            found = self.fs.find(self.root, detail=True)
        return {
            p[len(prefix) :]: (int(info["size"]), str(info.get("ETag", "")).strip('"'))
            for p, info in found.items()
            if p.startswith(prefix)
        }

    def _local_listing(self) -> dict[str, tuple[int, str]]:
        """os.scandir directly: fsspec's local find builds an info dict per file, 8.8 s of a 100k-shard
        status (300k files) where this takes about one. Symlinked folders are not followed."""
        out: dict[str, tuple[int, str]] = {}
        folders = [(self.root, "")]
        with self.errors("", "list"):
            while folders:
                folder, rel = folders.pop()
                try:
                    entries = os.scandir(folder)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                with entries:
                    for e in entries:
                        name = f"{rel}{e.name}"
                        if e.is_dir(follow_symlinks=False):
                            folders.append((e.path, name + "/"))
                        else:
                            st = e.stat()
                            out[name] = (st.st_size, f"{st.st_mtime_ns}:{st.st_ino}")
        return out

    def content_tag(self, data: bytes) -> str | None:
        """The tag a listing shows for a file of these bytes written by `write_bytes`, where a tag
        is a content hash (S3's ETag of a single PUT: MD5); None where it is not (local folders,
        and stores whose ETags are not MD5s simply never match)."""
        return None if self.local else hashlib.md5(data, usedforsecurity=False).hexdigest()

    # ----------------------------------------------------------------- writes

    def write_bytes(self, name: str, data: bytes, exclusive: bool = False) -> None:
        """Write atomically. exclusive=True creates the file only if it does not exist yet (else
        FileExistsError): of two writers racing to commit the same shard, exactly one wins."""
        with self.errors(name, "write"):
            if self.local:
                target = Path(self.path(name))
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if exclusive:
                    try:
                        os.link(tmp, target)  # fails if the target exists, unlike rename
                    finally:
                        tmp.unlink()
                else:
                    os.replace(tmp, target)
            else:
                from sdfleet.schemas.layout import (
                    content_type,
                )  # pydantic: not on the engine's import path

                # One PUT: S3 makes a single object visible whole or not at all. mode="create"
                # sends If-None-Match: *, which S3 enforces (412 -> FileExistsError).
                self.fs.pipe_file(
                    self.path(name),
                    data,
                    mode="create" if exclusive else "overwrite",
                    ContentType=content_type(name),
                )

    def delete(self, name: str) -> None:
        with self.errors(name, "delete"):
            self.fs.rm_file(self.path(name))

    def write_json(self, name: str, obj: Any, exclusive: bool = False) -> None:
        self.write_bytes(name, json_bytes(obj), exclusive=exclusive)

    @contextlib.contextmanager
    def errors(self, name: str, action: str):
        """Re-raise IO errors as `StorageError`s that name the full URI and what to do.

        FileExistsError passes through untouched: it is how an exclusive create loses a race.
        """
        try:
            yield
        except FileExistsError:
            raise
        except StorageError:
            raise
        except Exception as e:
            error = storage_error(e, f"cannot {action} {self.url(name)}", self.fs.storage_options)
            if error is None:
                raise
            raise error from e

    # ---------------------------------------------------- staged writes (the shard commit protocol)

    def stage(
        self,
        local_path: str | Path,
        name: str,
        writer_id: str,
        content_type: str,
        sha256: str | None = None,
    ) -> StagedFile:
        """Put a finished local file where no reader sees it yet, ready to be published as `name`:
        on S3 an uncompleted multipart upload to its final key; locally a hidden file beside its
        final name, fsynced with its folder. See `sdfleet.actors.writer` for the protocol."""
        from sdfleet.schemas.layout import StagedFile

        size = os.path.getsize(local_path)
        sha256 = sha256 or file_sha256(local_path)
        with self.errors(name, "stage"):
            if self.local:
                target = Path(self.path(name))
                target.parent.mkdir(parents=True, exist_ok=True)
                temp = target.with_name(f".{target.name}.{writer_id}.staged")
                shutil.copyfile(local_path, temp)
                _fsync(temp)
                _fsync(target.parent)
                return StagedFile(size=size, sha256=sha256, temp=temp.name)
            bucket, key, _ = self.fs.split_path(self.path(name))
            upload = self.fs.call_s3(
                "create_multipart_upload", Bucket=bucket, Key=key, ContentType=content_type
            )
            parts = []
            with open(local_path, "rb") as f:
                while True:
                    chunk = f.read(STAGE_PART_BYTES)
                    if parts and not chunk:
                        break
                    part = self.fs.call_s3(
                        "upload_part",
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload["UploadId"],
                        PartNumber=len(parts) + 1,
                        Body=chunk,
                    )
                    parts.append(part["ETag"].strip('"'))
            return StagedFile(size=size, sha256=sha256, upload_id=upload["UploadId"], parts=parts)

    def publish(self, name: str, staged: StagedFile) -> None:
        """Make a staged file visible as `name` and check it is; idempotent, so a roll-forward may
        repeat what a crashed writer had already done."""
        with self.errors(name, "publish"):
            if self.local:
                target = Path(self.path(name))
                temp = target.with_name(staged.temp)
                if temp.exists():
                    os.replace(temp, target)
                    _fsync(target.parent)
            else:
                bucket, key, _ = self.fs.split_path(self.path(name))
                parts = [
                    {"PartNumber": i + 1, "ETag": f'"{etag}"'}
                    for i, etag in enumerate(staged.parts)
                ]
                try:
                    done = self.fs.call_s3(
                        "complete_multipart_upload",
                        Bucket=bucket,
                        Key=key,
                        UploadId=staged.upload_id,
                        MultipartUpload={"Parts": parts},
                    )
                    # s3fs caches listings, and calls made through call_s3 do not update them.
                    self.fs.invalidate_cache(self.path(name))
                    if done.get("ETag", "").strip('"') == multipart_etag(staged.parts):
                        return  # S3 made exactly these parts the object
                except Exception as e:  # completed before (or aborted): what is visible decides
                    if not _no_such_upload(e):
                        raise
        problem = self.published_problem(name, staged)
        if problem:
            raise StorageError(f"cannot publish {self.url(name)}: {problem}")

    def is_staged(self, name: str, staged: StagedFile) -> bool:
        """Whether a staged file can still be published: its upload is neither completed nor
        aborted (or expired by a bucket's lifecycle rule), its hidden file still there."""
        with self.errors(name, "check"):
            if self.local:
                return Path(self.path(name)).with_name(staged.temp).exists()
            bucket, key, _ = self.fs.split_path(self.path(name))
            try:
                self.fs.call_s3(
                    "list_parts", Bucket=bucket, Key=key, UploadId=staged.upload_id, MaxParts=1
                )
                return True
            except Exception as e:
                if _no_such_upload(e):
                    return False
                raise

    def discard(self, name: str, staged: StagedFile) -> None:
        """Throw away a staged file that lost the commit; what is visible as `name` is untouched."""
        with self.errors(name, "discard"):
            if self.local:
                Path(self.path(name)).with_name(staged.temp).unlink(missing_ok=True)
                return
            bucket, key, _ = self.fs.split_path(self.path(name))
            try:
                self.fs.call_s3(
                    "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=staged.upload_id
                )
            except Exception as e:
                if not _no_such_upload(e):
                    raise

    def published_problem(self, name: str, staged: StagedFile, deep: bool = False) -> str | None:
        """Why what is visible as `name` is not the staged file, or None: missing, another size, and
        with deep=True other bytes (sha256)."""
        self.fs.invalidate_cache()
        with self.errors(name, "check"):
            try:
                size = int(self.fs.info(self.path(name))["size"])
            except FileNotFoundError:
                size = None
            problem = self.visible_problem(name, staged, size)
            if problem is None and deep:
                digest = hashlib.sha256(self.read_bytes(name)).hexdigest()
                if digest != staged.sha256:
                    problem = f"{self.url(name)} has sha256 {digest[:12]}…; its commit says {staged.sha256[:12]}…"
        return problem

    def visible_problem(self, name: str, staged: StagedFile, size: int | None) -> str | None:
        """Why a file of `size` bytes under `name` (None: not there) is not the staged file, or None.

        Sizes only, no S3 ETags: an ETag changes when an output is copied (CopyObject, `aws s3
        sync`), and no writer but the committing one ever completes an upload to these names;
        `status --verify` compares the bytes themselves."""
        if size is None:
            return f"{self.url(name)} is missing"
        if size != staged.size:
            return f"{self.url(name)} has {size} bytes; its commit says {staged.size}"
        return None

    def discard_leftovers(self, referenced: set[str]) -> int:
        """Discard staged files that no commit refers to (`referenced`: upload ids and hidden file
        names), left by writers that lost a commit or died before one; returns how many. Called
        once a job is complete, when no writer can still be at work."""
        found = 0
        with self.errors("", "clean up"):
            if self.local:
                for temp in Path(self.root).rglob(".*.staged"):
                    if temp.name not in referenced:
                        temp.unlink(missing_ok=True)
                        found += 1
                return found
            bucket, prefix, _ = self.fs.split_path(self.root + "/")
            kwargs = {"Bucket": bucket, "Prefix": prefix}
            while True:
                page = self.fs.call_s3("list_multipart_uploads", **kwargs)
                for upload in page.get("Uploads", []):
                    if upload["UploadId"] not in referenced:
                        self.fs.call_s3(
                            "abort_multipart_upload",
                            Bucket=bucket,
                            Key=upload["Key"],
                            UploadId=upload["UploadId"],
                        )
                        found += 1
                if not page.get("IsTruncated"):
                    return found
                kwargs.update(
                    KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"]
                )
