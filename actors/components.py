"""Components loaded apart from a checkpoint and handed to its pipeline's from_pretrained in place
of its own: `model.vae` (an fp16-fixed SDXL VAE, say). Loaded once per actor, with safetensors
only, in the job's dtype; an `s3://` folder through the node's model cache, as the checkpoint is.

A second pipeline in the same actor (a refiner) passes the same loaded VAE, so both decode alike.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sdfleet.actors.model_cache import local_copy
from sdfleet.schemas.errors import ModelLoadError, first_line
from sdfleet.schemas.families import FAMILIES

if TYPE_CHECKING:
    from sdfleet.schemas.families import Family
    from sdfleet.schemas.spec import ModelSpec

log = logging.getLogger("sdfleet")


def dtype_keyword(diffusers_version: str) -> str:
    """The from_pretrained keyword for the dtype: `dtype` from diffusers 0.40 (the older name then
    warns), `torch_dtype` before (which would ignore `dtype` and load float32)."""
    from packaging.version import Version

    return "dtype" if Version(diffusers_version) >= Version("0.40") else "torch_dtype"


def checkpoint_class(source: str, revision: str | None, storage_options: dict) -> str | None:
    """The pipeline class a checkpoint's model_index.json names (an s3:// folder through the
    node's model cache, as `load_pretrained` reads it); None where it cannot be read, for
    `load_pretrained` to say why."""
    import diffusers

    try:
        path = local_copy(source, storage_options)
        return diffusers.DiffusionPipeline.load_config(path, revision=revision).get("_class_name")
    except Exception:  # noqa: BLE001 -- loading it fails next, naming the spec key
        return None


def load_pretrained(
    cls, key: str, source: str, revision: str | None, storage_options: dict, dtype: str, **parts
) -> Any:
    """`cls.from_pretrained` of `source` (a hub id, a local folder, or an s3:// mirror through the
    node's model cache) in `dtype` (a torch dtype's name), on the CPU, with safetensors only:
    pickle checkpoints can run code on load. `parts`: components passed in place of its own. A
    failure to load is a ModelLoadError naming the spec key that named the source."""
    import diffusers
    import torch

    t0 = time.perf_counter()
    path = local_copy(source, storage_options)
    try:
        loaded = cls.from_pretrained(
            path,
            revision=revision,
            use_safetensors=True,
            **{dtype_keyword(diffusers.__version__): getattr(torch, dtype)},
            **parts,
        )
    except Exception as e:
        raise ModelLoadError(
            f"cannot load {key} {source} as a {cls.__name__}: {type(e).__name__}: {first_line(e)}"
        ) from e
    log.info(
        "loaded %s %s as %s (%s) in %.1fs",
        key,
        source,
        type(loaded).__name__,
        dtype,
        time.perf_counter() - t0,
    )
    return loaded


def load_vae(model: ModelSpec, dtype: str) -> Any | None:
    """model.vae as an AutoencoderKL in `dtype`; None where the spec names none (the checkpoint's
    own VAE is used). Read with getattr, as the engine reads the model: bench/gpu passes a
    duck-typed model without pydantic."""
    if getattr(model, "vae", None) is None:
        return None
    import diffusers

    return load_pretrained(
        diffusers.AutoencoderKL,
        "model.vae",
        model.vae,
        model.vae_revision,
        model.storage_options,
        dtype,
    )


def component_overrides(model: ModelSpec, dtype: str) -> dict[str, Any]:
    """The from_pretrained keywords that put the spec's components in place of the checkpoint's
    own: {"vae": ...} with model.vae; with model.drop_t5 the droppable encoder and its tokenizer
    as None (SD3's text_encoder_3, tokenizer_3: pre-flight allows it for SD3 checkpoints only);
    else nothing."""
    vae = load_vae(model, dtype)
    overrides: dict[str, Any] = {"vae": vae} if vae is not None else {}
    if getattr(model, "drop_t5", False):
        for family in FAMILIES.values():
            encoder = family.droppable_encoder
            if encoder is not None:
                overrides.update({encoder.component: None, encoder.tokenizer: None})
    return overrides


def vae_decode_dtype(family: Family, vae: Any, dtype: str) -> str | None:
    """The dtype the pipeline decodes latents in: float32 where the family's pipeline upcasts a
    float16 VAE whose config says force_upcast (SDXL's own VAE), else the job's dtype (an
    fp16-fixed VAE says force_upcast: false and decodes in float16). None for a family whose
    pipeline never upcasts (SD2: the decode is always in the job's dtype)."""
    if not family.vae_upcast:
        return None
    force_upcast = bool(getattr(getattr(vae, "config", None), "force_upcast", False))
    return "float32" if dtype == "float16" and force_upcast else dtype
