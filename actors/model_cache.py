"""Models and weights on a worker's node: an `s3://` mirror copied once per node into a local
cache (checked against a manifest on every reuse), and the hash that pins weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdfleet.actors.storage import Storage, file_sha256
from sdfleet.schemas.content import listing_digest
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.locations import check_inside, kind_of

log = logging.getLogger("sdfleet")


def local_copy(source: str, storage_options: dict[str, Any] | None = None) -> str:
    """Where to load a model or weights file from on this node: an `s3://` (or other remote) source
    is copied once into the node cache (`cached_copy`); a local path has `~` expanded; anything
    else (a hub id) is returned as given, for `from_pretrained` to resolve."""
    kind = kind_of(source)
    if kind == "remote":
        return str(cached_copy(source, storage_options))
    return str(Path(source).expanduser()) if kind == "local" else source


def weights_sha256(path: str | Path) -> str:
    """The hash of a weights file, or of every file in a weights folder (names and contents)."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".sdfleet"))
    )
    outer = hashlib.sha256()
    for f in files:
        outer.update(f"{f.relative_to(path) if f != path else f.name}\0{file_sha256(f)}\n".encode())
    return outer.hexdigest()


def cached_copy(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    cache_root: str | None = None,
    expected_digest: str | None = None,
) -> Path:
    """Copy a remote folder or file (e.g. an s3:// model mirror) once per node into a local cache.

    A file lock makes concurrent actors on one node share one copy; a manifest of sizes and of the
    listing's hash (`sdfleet.schemas.content.listing_digest`), written last, marks the copy
    complete and is checked on every reuse. expected_digest: the hash the driver resolved; a copy
    of another hash is made again, and a source that no longer has it is refused. Returns the
    local folder, or the local file for a single-file source.
    """
    from filelock import FileLock

    root = Path(cache_root or os.environ.get("SDFLEET_CACHE", Path.home() / ".cache" / "sdfleet"))
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    dest = root / "models" / digest
    manifest_path = dest / ".sdfleet-manifest.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    src = Storage(uri, storage_options)
    with FileLock(str(dest) + ".lock"):
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            fresh = expected_digest in (None, manifest.get("digest"))
            if fresh and _manifest_matches(dest, manifest["files"]):
                return dest / manifest["single_file"] if manifest.get("single_file") else dest
        # 1. List the source: every file below a folder, or the one file, with its ETag.
        entries = remote_entries(uri, storage_options)
        digest = listing_digest(entries)
        if expected_digest is not None and digest != expected_digest:
            raise ModelLoadError(
                f"{uri} changed since the driver planned this job (its listing's hash is now "
                f"{digest[:12]}, planned {expected_digest[:12]}); rerun to plan the job again"
            )
        single = next(iter(entries)) if src.fs.isfile(src.root) else None
        listing = {
            rel: (src.root if single else src.path(rel), size) for rel, (size, _) in entries.items()
        }
        # 2. Copy into a private temp folder, check sizes, then move it into place in one rename.
        #    Object keys are the bucket owner's to choose: one that would land outside the copy
        #    (a `..` segment, an absolute path) could drop a .pth into site-packages. Refuse it.
        for rel in listing:
            check_inside(dest, rel, f"{uri}: object key {rel!r}")
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{digest}-"))
        for rel, (remote_path, _) in sorted(listing.items()):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            src.fs.get_file(remote_path, str(tmp / rel))
        sizes = {rel: size for rel, (_, size) in listing.items()}
        if not _manifest_matches(tmp, sizes):
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(f"copy of {uri} is incomplete: sizes differ from the source")
        (tmp / manifest_path.name).write_text(
            json.dumps({"source": uri, "files": sizes, "single_file": single, "digest": digest})
        )
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        log.info("copied %s (%d files) to %s", uri, len(sizes), dest)
        return dest / single if single else dest


def remote_entries(uri: str, storage_options: dict[str, Any] | None = None) -> dict:
    """name -> (size, ETag) of every object below a remote folder, or of the one object."""
    storage = Storage(uri, storage_options)
    with storage.errors("", "list"):
        if storage.fs.isfile(storage.root):
            info = storage.fs.info(storage.root)
            name = storage.root.rsplit("/", 1)[-1]
            return {name: (int(info["size"]), str(info.get("ETag", "")).strip('"'))}
    entries = storage.tagged_listing()
    if not entries:
        raise FileNotFoundError(f"{uri} is empty or does not exist")
    return entries


def _manifest_matches(folder: Path, files: dict[str, int]) -> bool:
    return all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size
        for rel, size in files.items()
    )
