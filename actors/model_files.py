"""What a model file is, read from its headers alone (no torch, no tensorflow, no weights loaded):
a CLIP folder's config.json, a safetensors head's shapes and metadata, a Keras .h5's signature.

The driver runs these on local paths before any worker starts, so that a model of the wrong kind or
format is one line naming its key (`curation.clip_model`, `safety.model` ...) rather than a worker's
traceback after the GPUs are up; the workers' loaders check the same things again on their copies.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sdfleet.schemas.errors import ModelLoadError

# Every HDF5 file (Keras .h5) begins with these 8 bytes; h5py aborts the process on some files
# without them, so they are read first.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A safetensors header is JSON of at most this many bytes (the format's own bound).
SAFETENSORS_HEADER_LIMIT = 100_000_000


@dataclass(frozen=True)
class SafetensorsHeader:
    shapes: dict[str, list[int]]
    metadata: dict[str, str]


def read_safetensors_header(path: str | Path, what: str) -> SafetensorsHeader:
    """The tensors' shapes and the metadata of a .safetensors file, from its JSON header."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > SAFETENSORS_HEADER_LIMIT:
                raise ValueError("header length out of range")
            header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None) or {}
        shapes = {name: list(entry["shape"]) for name, entry in header.items()}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(
            f"{what} {path} is not a readable safetensors file ({type(e).__name__}: {e})"
        ) from None
    return SafetensorsHeader(shapes, metadata)


def check_head_file(
    path: str | Path, kind: str, what: str, embedding_size: int | None = None
) -> None:
    """A curation head (`actors.curation.Head`'s layout): says it is a `kind` head, has layers,
    and takes `embedding_size`-wide embeddings (None: not known here)."""
    header = read_safetensors_header(path, what)
    said = header.metadata.get("sdfleet_head")
    if said != kind:
        raise ModelLoadError(
            f"{what} {path} says it is a {said!r} head, not {kind!r} (safetensors metadata "
            "sdfleet_head): give the head made for this key"
        )
    first = header.shapes.get("layers.0.weight")
    if not first or len(first) != 2:
        raise ModelLoadError(f"{what} {path} has no layers.0.weight: it is not an sdfleet head")
    if embedding_size is not None and first[1] != embedding_size:
        raise ModelLoadError(
            f"{what} {path} takes {first[1]}-wide embeddings, but curation.clip_model's are "
            f"{embedding_size}: use the head made for that CLIP model"
        )


def read_config(folder: str | Path) -> dict | None:
    """A transformers model folder's config.json, or None when the path has none."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        return None


def _describe(config: dict | None) -> str:
    if config is None:
        return "it has no config.json"
    kind = config.get("model_type") or ", ".join(config.get("architectures") or []) or "unknown"
    return f"its config.json says {kind!r}"


def clip_embedding_size(config: dict | None, source: str, what: str) -> int:
    """A CLIPModel's embedding width (projection_dim) from its config.json (None or {}: the folder
    has none); refused when the config is not a CLIPModel's."""
    config = config or None
    architectures = (config or {}).get("architectures") or []
    if (
        config is None
        or config.get("model_type") != "clip"
        or (architectures and "CLIPModel" not in architectures)
    ):
        raise ModelLoadError(
            f"{what} {source} is not a CLIP model ({_describe(config)}): give a transformers "
            "CLIPModel folder (config.json model_type 'clip', safetensors weights)"
        )
    return int(config.get("projection_dim", 512))


def check_keras_file_format(path: str | Path, what: str = "safety.model") -> None:
    """A Keras detector's weights: an HDF5 .h5 file or a SavedModel folder, checked before h5py or
    tensorflow open them."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return
        raise ModelLoadError(
            f"{what} {path} is a folder without saved_model.pb ({_describe(read_config(path))}): "
            "nsfw-detector loads a Keras .h5 file or SavedModel folder"
        )
    with open(path, "rb") as f:
        start = f.read(len(HDF5_SIGNATURE))
    if start != HDF5_SIGNATURE:
        raise ModelLoadError(
            f"{what} {path} is not an HDF5 file (a Keras .h5 begins with the HDF5 signature): "
            "nsfw-detector loads a Keras .h5 file or SavedModel folder"
        )


def check_transformers_config(
    config: dict | None, source: str, what: str, architectures: tuple[str, ...], expected: str
) -> None:
    """A transformers model's config.json (None or {}: the folder has none) names an architecture
    ending in one of `architectures`."""
    names = (config or {}).get("architectures") or []
    if not any(n.endswith(architectures) for n in names):
        raise ModelLoadError(f"{what} {source} is not {expected} ({_describe(config or None)})")
