"""What a job's bytes are, beyond its spec: the content identity of every input file, of the image
and mask files its rows point at, and of every model checkpoint, as the driver resolved them once.

They join the fingerprint (`Plan.fingerprint`) and `_job.json` ("content"), so a resume whose
input or model changed under the same names is refused with the names of what changed, and
workers load what the driver resolved (`sdfleet.actors.model_content.pin_model`). Data only: the
driver's resolving is `sdfleet.jobs.content`'s, the model hashing `sdfleet.actors.model_content`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from sdfleet.schemas.lora import lora_key

# JobContent.models is keyed by the spec key that names each checkpoint's location: the main one's
# is model.source; further checkpoints (a refiner, a VAE override) are keyed by their own keys.
MAIN_MODEL = "model.source"
REFINER_MODEL = "model.refiner.source"
VAE_MODEL = "model.vae"


def checkpoints_of(model: Any) -> dict[str, tuple[str, str | None]]:
    """Every checkpoint a ModelSpec loads, as (source, revision), by the spec key naming it: the
    main one, model.refiner's and model.vae's where set, and each of model.loras' files."""
    found = {MAIN_MODEL: (model.source, model.revision)}
    for i, lora in enumerate(getattr(model, "loras", ())):
        found[lora_key(i)] = (lora.location(), lora.revision)
    if getattr(model, "refiner", None) is not None:
        found[REFINER_MODEL] = (model.refiner.source, model.refiner.revision)
    if getattr(model, "vae", None) is not None:
        found[VAE_MODEL] = (model.vae, model.vae_revision)
    return found


@dataclass(frozen=True)
class ModelContent:
    """One checkpoint's identity: for a hub id the commit its revision resolved to (workers load
    that commit); for an s3:// mirror a hash of its listing's keys, sizes and ETags; for a local
    folder a hash of its files' names, sizes and mtimes and of its small files' bytes."""

    source: str
    kind: str  # "hub" | "remote" | "local" (sdfleet.schemas.locations.kind_of)
    digest: str
    revision: str | None = None  # hub: the resolved commit
    files: int = 0  # files hashed (0 for a hub id)

    def describe(self) -> str:
        return f"{self.kind} {self.digest[:12]}" + (f" ({self.files} files)" if self.files else "")


@dataclass(frozen=True)
class JobContent:
    """The content identities a job was planned with."""

    # Input file URI -> its identity: "etag:..." (object stores) or "size:mtime_ns:footer-sha256".
    input_files: dict[str, str] = field(default_factory=dict)
    # A hash over the image and mask files the rows point at (name and identity each), with their
    # count; None where rows point at none (text-to-image, inline bytes, an earlier output).
    input_images: str | None = None
    input_image_files: int = 0
    models: dict[str, ModelContent] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobContent:
        models = {k: ModelContent(**v) for k, v in data.get("models", {}).items()}
        return cls(**{**data, "models": models})

    def main_model_digest(self) -> str | None:
        model = self.models.get(MAIN_MODEL)
        return model.digest if model else None


def content_changes(before: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """What changed between the content a job recorded (its `_job.json` "content") and what is
    there now (both as JSON), one phrase each naming the file or model; [] when nothing did."""
    if before is None or now is None:
        return []
    old, after = JobContent.from_json(before), JobContent.from_json(now)
    out = []
    for uri in sorted(set(old.input_files) & set(after.input_files)):
        if old.input_files[uri] != after.input_files[uri]:
            out.append(
                f"input file {uri} changed content under the same name ({old.input_files[uri]} -> "
                f"{after.input_files[uri]})"
            )
    if old.input_images != after.input_images:
        out.append(
            f"the image/mask files the input rows point at changed ({old.input_image_files} files, "
            f"hash {str(old.input_images)[:12]} -> {after.input_image_files} files, hash "
            f"{str(after.input_images)[:12]})"
        )
    for key in sorted(set(old.models) | set(after.models)):
        was, now = old.models.get(key), after.models.get(key)
        if was is None or now is None or was.digest != now.digest:
            source = (now or was).source
            out.append(
                f"{key} {source} changed content "
                f"({was.describe() if was else '<none>'} -> {now.describe() if now else '<none>'})"
            )
    return out


def listing_digest(entries: dict[str, tuple[int, str]]) -> str:
    """A hash of a folder's listing, name -> (size, tag): the tag an object store's ETag, or a
    local file's mtime (and, for small files, a hash of their bytes). Sorted, so listing order
    never matters."""
    outer = hashlib.sha256()
    for name, (size, tag) in sorted(entries.items()):
        outer.update(f"{name}\0{size}\0{tag}\n".encode())
    return outer.hexdigest()
