"""model.loras: LoRA adapters applied to the checkpoint's denoiser, each a safetensors file at a
scale. The spec section, where each file is, and what its tensor names must look like; read from
the file's header alone (no torch), so the driver refuses a wrong file before any GPU starts and
a worker checks a remote one the same way before diffusers reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from pydantic import field_validator

from sdfleet.schemas.locations import check_model_location, kind_of
from sdfleet.schemas.section import Section
from sdfleet.schemas.weights import is_safetensors

# peft keys its adapters by name inside module dicts: no dots, nothing a path could hold.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What the first tensor names of a file for a UNet or transformer hold besides diffusers' own
# `unet.` / `transformer.` prefix: kohya's and the original repositories' (FLUX.1 LoRAs from
# kohya also say lora_unet_).
_KOHYA_DENOISER = ("lora_unet_", "diffusion_model.", "lora_transformer_")


class LoraSpec(Section):
    # A .safetensors file (local or s3://), or a folder or hub id with weight_name naming the file.
    source: str
    weight_name: str | None = None
    # The adapter's weight: 1.0 as trained, 0 none, up to what the user sweeps.
    scale: float = 1.0
    # The adapter's name in diffusers (set_adapters) and in the rows; null: derived from the file.
    name: str | None = None
    # A hub id's revision (pinned to its commit by the driver); null: main.
    revision: str | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_model_location("source", v)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"scale={v} is not a finite number; give e.g. 1.0")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.fullmatch(v):
            raise ValueError(
                f"name={v!r}: use 1-64 letters, digits, '_' or '-' (it names the adapter)"
            )
        return v

    def location(self) -> str:
        """The file itself: source, or source/weight_name; a hub id stays as it is (its file is
        weight_name inside the repository)."""
        if self.weight_name is None or kind_of(self.source) == "hub":
            return self.source
        return f"{self.source.rstrip('/')}/{self.weight_name}"

    def file_name(self) -> str:
        return self.weight_name or self.source.rstrip("/").rsplit("/", 1)[-1]


def lora_key(i: int) -> str:
    """The spec key naming LoRA i's file, as errors and the job's content identity say it."""
    return f"model.loras[{i}].source"


def named_loras(loras: list[LoraSpec]) -> list[LoraSpec]:
    """Each LoRA with a name: its own, or its file's stem made unique (`style`, `style-2`);
    refuses a file that is not safetensors, and two LoRAs of one name."""
    taken = {lo.name for lo in loras if lo.name is not None}
    out, seen = [], set()
    for i, lora in enumerate(loras):
        if not is_safetensors(lora.file_name()):
            what = "weight_name" if lora.weight_name else "source"
            raise ValueError(
                f"model.loras[{i}].{what}={getattr(lora, what)!r} is not a .safetensors file; "
                "sdfleet loads LoRAs from safetensors only (a pickle runs code when loaded): "
                "convert it once, or give weight_name for a folder or hub id"
            )
        name = lora.name
        if name is None:
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", lora.file_name().removesuffix(".safetensors"))
            name, n = stem[:60] or "lora", 1
            while name in taken or name in seen:
                n += 1
                name = f"{stem[:60]}-{n}"
        elif name in seen:
            raise ValueError(f"model.loras[{i}].name={name!r} is used twice; give each a name")
        seen.add(name)
        out.append(lora if lora.name == name else lora.model_copy(update={"name": name}))
    return out


def check_lora_tensors(names: Iterable[str], denoiser: str, what: str) -> None:
    """A LoRA file's tensor names (its safetensors header's): LoRA weights (`lora` in their
    names) that reach the family's denoiser (`unet`, `transformer`); ValueError otherwise."""
    names = list(names)
    lora = [n for n in names if "lora" in n.lower()]
    if not lora:
        example = names[0] if names else "none"
        raise ValueError(
            f"{what} holds no LoRA weights (no tensor name says lora; first: {example}): give the "
            "LoRA's .safetensors file, not a checkpoint"
        )
    prefixes = (f"{denoiser}.", f"{denoiser}_", *_KOHYA_DENOISER)
    if not any(n.startswith(prefixes) or f".{denoiser}." in n for n in lora):
        raise ValueError(
            f"{what} has no LoRA weights for this checkpoint's {denoiser} (first: {lora[0]}): "
            f"it was trained for another family, or for the text encoder only; give a LoRA made "
            "for this model.source"
        )
