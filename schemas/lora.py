"""model.loras: LoRA adapters applied to the checkpoint's denoiser, each a safetensors file at a
scale (the spec section is `sdfleet.schemas.spec.LoraSpec`). Their names, and what a file's tensor
names must look like, read from its header alone (no torch, no pydantic: the engine imports this),
so the driver refuses a wrong file before any GPU starts and
a worker checks a remote one the same way before diffusers reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from sdfleet.schemas.weights import is_safetensors

# peft keys its adapters by name inside module dicts: no dots, nothing a path could hold.
LORA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What the first tensor names of a file for a UNet or transformer hold besides diffusers' own
# `unet.` / `transformer.` prefix: kohya's and the original repositories' (FLUX.1 LoRAs from
# kohya also say lora_unet_).
_KOHYA_DENOISER = ("lora_unet_", "diffusion_model.", "lora_transformer_")


def check_lora_scale(value: Any, what: str = "scale") -> float:
    """A LoRA's scale: a finite number (model.loras[i].scale, a sweep.axes.lora_scale value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}={value!r} is not a finite number; give e.g. 1.0")
    return float(value)


def lora_key(i: int) -> str:
    """The spec key naming LoRA i's file, as errors and the job's content identity say it."""
    return f"model.loras[{i}].source"


def named_loras(loras: list[Any]) -> list[Any]:
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
