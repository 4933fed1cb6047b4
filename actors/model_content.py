"""A checkpoint's content identity, resolved once on the driver (`model_content`), and the check
that makes a worker load exactly that (`pin_model`, `verify_content`).

One function for every checkpoint a job loads (model.source, and any further checkpoint named by
a source and a revision), so each is identified and pinned the same way:

- a hub id: its revision resolved to a commit (the hub's answer, or the local cache's snapshot
  when offline); workers load that commit, so a node that starts later cannot load a newer one;
- an s3:// (or other remote) mirror: a hash of its listing's keys, sizes and ETags; the node cache
  (`sdfleet.actors.model_cache.cached_copy`) copies it again when its copy is of another hash, and
  refuses a mirror that changed since the driver resolved it;
- a local folder: a hash of its files' names, sizes and mtimes, and of the bytes of its small files
  (configs, tokenizers, scheduler: edits there change images, and they cost nothing to read).
  Weights are not read: hashing gigabytes on every plan and every worker start would cost
  minutes, and rewriting them moves their mtime. Workers hash their own node's folder and refuse
  one that differs.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from sdfleet.actors.model_cache import cached_copy, remote_entries
from sdfleet.schemas.content import (
    MAIN_MODEL,
    REFINER_MODEL,
    VAE_MODEL,
    JobContent,
    ModelContent,
    listing_digest,
)
from sdfleet.schemas.errors import ModelLoadError, first_line
from sdfleet.schemas.locations import kind_of
from sdfleet.schemas.lora import lora_key

# How long the driver waits for the Hugging Face hub before saying it cannot reach it.
HUB_TIMEOUT_S = 10.0
# Files up to this size are hashed by their bytes in a local folder, besides their size and mtime.
SMALL_FILE_BYTES = 1 << 20
_COMMIT = re.compile(r"[0-9a-f]{40}")


def model_content(
    source: str, revision: str | None = None, storage_options: dict[str, Any] | None = None
) -> ModelContent:
    """The content identity of a checkpoint (see the module's docstring), for a hub id, a remote
    mirror or a local folder or file."""
    kind = kind_of(source)
    if kind == "remote":
        entries = remote_entries(source, storage_options)
        return ModelContent(source, kind, listing_digest(entries), files=len(entries))
    if kind == "local":
        entries = local_entries(Path(source).expanduser())
        return ModelContent(source, kind, listing_digest(entries), files=len(entries))
    if kind == "missing":
        raise ModelLoadError(f"{source} does not exist")
    commit = resolve_hub_commit(source, revision)
    return ModelContent(source, "hub", commit, revision=commit)


def local_entries(path: Path) -> dict[str, tuple[int, str]]:
    """name -> (size, mtime in ns and, for a small file, the sha256 of its bytes) of every file in a
    local folder (or of the one file). Not the inode: a copy that kept its mtimes (rsync -a, an
    image layer) on another node is the same checkpoint."""
    files = (
        {path.name: path}
        if path.is_file()
        else {
            str(p.relative_to(path)): p
            for p in path.rglob("*")
            if p.is_file() and not p.name.startswith(".sdfleet")
        }
    )
    out = {}
    for name, p in files.items():
        st = p.stat()
        tag = str(st.st_mtime_ns)
        if st.st_size <= SMALL_FILE_BYTES:
            tag += ":" + hashlib.sha256(p.read_bytes()).hexdigest()
        out[name] = (st.st_size, tag)
    return out


def resolve_hub_commit(repo: str, revision: str | None) -> str:
    """The commit a hub id's revision (None: main) names: a commit as given, else the hub's
    answer, or with HF_HUB_OFFLINE the snapshot the local cache holds for it."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    import huggingface_hub
    from huggingface_hub import constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        cached = huggingface_hub.try_to_load_from_cache(repo, "model_index.json", revision=revision)
        commit = Path(cached).parent.name if isinstance(cached, str) else ""
        if not _COMMIT.fullmatch(commit):
            raise ModelLoadError(
                f"model.source {repo}: HF_HUB_OFFLINE is set and the local Hugging Face cache holds "
                f"no snapshot of revision {revision or 'main'}; point model.source at a local "
                "folder or an s3:// mirror"
            )
        return commit
    try:
        info = huggingface_hub.model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 -- network, not found, gated: each said in one line
        raise ModelLoadError(
            f"cannot resolve {repo} revision {revision or 'main'} on the Hugging Face hub "
            f"({type(e).__name__}: {first_line(e)[:120]}); pin model.revision to a commit, or "
            "point model.source at a local folder or an s3:// mirror"
        ) from None
    if not info.sha:
        raise ModelLoadError(f"the Hugging Face hub named no commit for {repo} {revision or ''}")
    return info.sha


def verify_content(content: ModelContent, storage_options: dict[str, Any] | None = None) -> str:
    """On a worker: make sure this node loads the checkpoint the driver resolved. Returns the
    revision to load (the resolved commit for a hub id; None otherwise). A remote mirror is copied
    to the node cache at that hash; a local folder that differs on this node is refused."""
    if content.kind == "hub":
        return content.revision
    if content.kind == "remote":
        cached_copy(content.source, storage_options, expected_digest=content.digest)
        return None
    found = model_content(content.source, None, storage_options)
    if found.digest != content.digest:
        raise ModelLoadError(
            f"{content.source} on this node is not what the driver planned with ({found.describe()}"
            f", planned {content.describe()}): it changed since, or this node's copy differs (copy "
            "it keeping its mtimes, e.g. rsync -a, or use an s3:// mirror); rerun to plan again"
        )
    return None


def pin_model(model: Any, content: ModelContent | None) -> Any:
    """`model` (a spec with source, revision and storage_options) as the driver resolved it: its
    revision pinned to the resolved commit, after `verify_content`. None: unpinned (a job
    planned before content was recorded)."""
    if content is None:
        return model
    revision = verify_content(content, model.storage_options)
    return model.model_copy(update={"revision": revision}) if revision else model


def pin_models(model: Any, content: JobContent | None) -> Any:
    """A ModelSpec with every checkpoint it names (the main one, model.refiner's, model.vae's,
    model.loras' files) as
    the driver resolved it: each verified on this node, a hub id's revision pinned to its commit.
    None: unpinned (a job planned before content was recorded)."""
    if content is None:
        return model

    def pinned(key: str, revision: str | None) -> str | None:
        found = content.models.get(key)
        return (verify_content(found, model.storage_options) or revision) if found else revision

    update: dict[str, Any] = {"revision": pinned(MAIN_MODEL, model.revision)}
    if getattr(model, "refiner", None) is not None:
        refiner_revision = pinned(REFINER_MODEL, model.refiner.revision)
        update["refiner"] = model.refiner.model_copy(update={"revision": refiner_revision})
    if getattr(model, "vae", None) is not None:
        update["vae_revision"] = pinned(VAE_MODEL, model.vae_revision)
    if getattr(model, "loras", None):
        update["loras"] = [
            lora.model_copy(update={"revision": pinned(lora_key(i), lora.revision)})
            for i, lora in enumerate(model.loras)
        ]
    return model.model_copy(update=update)
