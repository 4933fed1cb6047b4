"""Replacing a control record only if nobody else did meanwhile: compare-and-swap on storage.

`_job.json` may be replaced (a job that committed nothing, taken over by a changed spec) by any of
several drivers that judged the output at once; exactly one may. A record is read with its
version (`read_versioned`) and replaced only while it is still at that version
(`replace_if_unchanged`), else `ChangedMeanwhile`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdfleet.actors.storage import Storage
from sdfleet.schemas.errors import StorageError


class ChangedMeanwhile(Exception):
    """A conditional replace found the file no longer at the version it was read at."""


def read_versioned(storage: Storage, name: str) -> tuple[bytes, str]:
    """A file's bytes and its version: on S3 its ETag, looked at before and after the read (again
    while they differ, so that the bytes are that version's); locally the bytes' sha256."""
    with storage.errors(name, "read"):
        if storage.local:
            data = Path(storage.path(name)).read_bytes()
            return data, hashlib.sha256(data).hexdigest()
        path = storage.path(name)
        for _ in range(5):
            storage.fs.invalidate_cache(path)
            before = storage.fs.info(path)["ETag"]
            data = storage.fs.cat_file(path)
            storage.fs.invalidate_cache(path)
            if storage.fs.info(path)["ETag"] == before:
                return data, before
    raise StorageError(f"cannot read {storage.url(name)}: it kept changing while it was read")


def replace_if_unchanged(storage: Storage, name: str, data: bytes, version: str) -> None:
    """Replace a file with `data` only if it is still at `version` (from `read_versioned`), else
    ChangedMeanwhile: of two writers replacing one version, exactly one does.

    On S3 a conditional PUT (If-Match: the ETag). A 412 caused by this very PUT (its answer lost,
    the client's retry refused) is told apart by reading the file back. Locally, where a rename
    takes no condition, a claim on the version comes first: an exclusive create of a hidden file
    named after it, then a check that the file is still at that version; the claim is removed
    once the file is replaced, so a later version can be claimed in turn."""
    if not storage.local:
        _put_if_match(storage, name, data, version)
        return
    target = Path(storage.path(name))
    claim = target.with_name(f".{target.name}.{version[:32]}.replacing")
    with storage.errors(name, "write"):
        try:
            claim.touch(exist_ok=False)
        except FileExistsError:
            raise ChangedMeanwhile(storage.url(name)) from None
    try:
        if read_versioned(storage, name)[1] != version:
            raise ChangedMeanwhile(storage.url(name))
        storage.write_bytes(name, data)
    finally:
        claim.unlink(missing_ok=True)


def _put_if_match(storage: Storage, name: str, data: bytes, version: str) -> None:
    from sdfleet.schemas.layout import content_type

    bucket, key, _ = storage.fs.split_path(storage.path(name))
    with storage.errors(name, "write"):
        try:
            storage.fs.call_s3(
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=data,
                IfMatch=version,
                ContentType=content_type(name),
            )
            return
        except Exception as e:
            if not _precondition_failed(e):
                raise
    if read_versioned(storage, name)[0] != data:
        raise ChangedMeanwhile(storage.url(name))


def _precondition_failed(e: BaseException) -> bool:
    """S3's 412 (s3fs passes it on as an OSError carrying botocore's message)."""
    seen: BaseException | None = e
    while seen is not None:
        text = f"{type(seen).__name__} {seen}"
        if "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False
