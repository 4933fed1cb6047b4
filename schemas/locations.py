"""Where a spec's locations point: the rules for telling a remote URI, a local path and a hub id
apart, and for the input's folder and globs. Every check and loader reads them from here.

- remote: a URI with a scheme other than file:// (s3://bucket/key ...), read through fsspec;
- local: a path on this machine that exists;
- missing: written as a path (./, ../, /, ~) but nothing is there;
- hub: anything else, for `from_pretrained` to resolve as a Hugging Face hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sdfleet.schemas.errors import StorageError

# How a local path is written, as no hub id can begin (hub ids begin with a letter or digit).
PATH_PREFIXES = (".", "/", "~")
GLOB_CHARS = "*?["

Kind = Literal["remote", "local", "missing", "hub"]


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def written_as_path(value: str) -> bool:
    return value.startswith(PATH_PREFIXES)


def kind_of(value: str) -> Kind:
    """What a model, weights or head location names (see the module's docstring)."""
    if is_remote(value):
        return "remote"
    if Path(value).expanduser().exists():
        return "local"
    return "missing" if written_as_path(value) else "hub"


def is_glob(uri: str) -> bool:
    return any(c in uri for c in GLOB_CHARS)


def fixed_part(uri: str) -> str:
    """The part of a glob before its first glob character; the whole URI when it is none."""
    cut = min((uri.index(c) for c in GLOB_CHARS if c in uri), default=None)
    return uri if cut is None else uri[:cut]


def input_folder(uri: str) -> str:
    """The input's folder, which relative image URIs are read from: input.uri itself when it is a
    folder or prefix, the folder of a file, the fixed part of a glob."""
    uri = uri.rstrip("/")
    if is_glob(uri):
        return fixed_part(uri).rsplit("/", 1)[0]
    return uri.rsplit("/", 1)[0] if uri.endswith(".parquet") else uri


def check_inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, if that stays inside `folder` (no `..`, no absolute path, no symlink out);
    else a StorageError naming `what`. For names that come from data: object keys, ids."""
    parts = relative.replace("\\", "/").split("/")
    target = (folder / relative).resolve()
    if relative.startswith("/") or ".." in parts or not target.is_relative_to(folder.resolve()):
        raise StorageError(
            f"{what} points outside {folder}; refusing to write it. Whoever can write to that "
            "bucket is trying to reach the worker's file system: check the bucket"
        )
    return target


def check_model_location(key: str, value: str | None) -> str | None:
    """A spec key naming a model's location (model.source, model.vae, model.refiner.source):
    set or null, never empty."""
    if value is not None and not value.strip():
        raise ValueError(f"{key} is empty; give a hub id, a local folder or an s3:// folder")
    return value
