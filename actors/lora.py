"""model.loras on a worker: each LoRA file brought onto this node (an s3:// file copied once into
the node cache, a hub file downloaded at its pinned commit), checked from its safetensors header
as the driver checks local ones, hashed for the rows, then loaded into the pipeline.

With fixed scales the adapters are fused into the denoiser's weights and unloaded, so each step
runs at the base model's speed and torch.compile sees a plain model. A lora_scale sweep keeps the
one LoRA live instead and sets each batch's scale (batches are grouped by it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdfleet.actors.model_cache import local_copy
from sdfleet.actors.model_files import read_safetensors_header
from sdfleet.actors.storage import file_sha256
from sdfleet.schemas.errors import ModelLoadError
from sdfleet.schemas.locations import kind_of
from sdfleet.schemas.lora import check_lora_tensors, lora_key

log = logging.getLogger("sdfleet")


@dataclass(frozen=True)
class LoadedLora:
    """What the rows record of one LoRA (the `loras` column's struct)."""

    name: str
    source: str
    weight_name: str | None
    sha256: str
    scale: float

    def record(self) -> dict[str, Any]:
        return asdict(self)


def lora_file(lora: Any, storage_options: dict[str, Any] | None = None) -> Path:
    """Where LoRA `lora` (a LoraSpec) is on this node: a local file, the node cache's copy of a
    remote one, or the hub's file at its (pinned) revision."""
    if kind_of(lora.source) == "hub":
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(lora.source, lora.weight_name, revision=lora.revision))
    return Path(local_copy(lora.location(), storage_options))


def check_lora_file(path: Path, denoiser: str, what: str) -> None:
    """A LoRA file as the driver checks a local one: a safetensors header whose tensors are LoRA
    weights for this family's denoiser. Run before diffusers reads it, so a pickle never loads."""
    header = read_safetensors_header(path, what)
    try:
        check_lora_tensors(header.shapes, denoiser, f"{what} {path}")
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def lora_records(engine: Any) -> list[dict[str, Any]]:
    """What the rows record of an engine's LoRAs; [] without (bench's stand-in has no adapters)."""
    return [lo.record() for lo in getattr(getattr(engine, "adapters", None), "loaded", [])]


class Adapters:
    """model.loras on one pipeline: fused at their scales, or, with a lora_scale sweep (a warm-up
    point that sets one), left live so that each batch sets its own scale."""

    def __init__(self, pipe: Any, model: Any, denoiser: str, warm_up: Iterable[Any] = ()):
        swept = any(getattr(p, "lora_scale", None) is not None for p in warm_up)
        self.pipe = pipe
        self.loaded = apply_loras(pipe, model, denoiser, fuse=not swept)
        self.live = swept and bool(self.loaded)
        self.scale = self.loaded[0].scale if self.live else None

    def set_scale(self, scale: float | None) -> None:
        """The job's one LoRA at this batch's scale (None: model.loras' own)."""
        if scale is None or not self.loaded:
            return
        if not self.live:
            raise ValueError("the LoRAs are fused at one scale; a lora_scale needs them live")
        if scale != self.scale:
            self.pipe.set_adapters([self.loaded[0].name], adapter_weights=[scale])
            self.scale = scale


def apply_loras(pipe: Any, model: Any, denoiser: str, fuse: bool) -> list[LoadedLora]:
    """Load model.loras into `pipe` at their scales; fuse them (then unload the adapters) when
    `fuse`. Returns what the rows record of each; [] without LoRAs."""
    loras = getattr(model, "loras", None) or []
    loaded = []
    for i, lora in enumerate(loras):
        # 1. The file, checked from its header, hashed for the rows.
        path = lora_file(lora, model.storage_options)
        check_lora_file(path, denoiser, lora_key(i))
        # 2. Loaded by its .safetensors name: diffusers then never falls back to a pickle.
        pipe.load_lora_weights(
            str(path.parent), weight_name=path.name, adapter_name=lora.name, use_safetensors=True
        )
        loaded.append(
            LoadedLora(lora.name, lora.source, lora.weight_name, file_sha256(path), lora.scale)
        )
    if not loaded:
        return []
    names = [lo.name for lo in loaded]
    pipe.set_adapters(names, adapter_weights=[lo.scale for lo in loaded])
    if fuse:
        # lora_scale 1.0: set_adapters' weights are the scales already.
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    log.info(
        "LoRAs %s at scales %s%s",
        ", ".join(names),
        [lo.scale for lo in loaded],
        " (fused)" if fuse else "",
    )
    return loaded
