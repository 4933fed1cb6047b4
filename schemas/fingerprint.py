"""A job's fingerprint: which keys change what a job writes (and so its fingerprint, which a
resume must match). Which option values are secrets is schemas/secrets.py's.

No pydantic here: it works on the spec's JSON form (`JobSpec.model_dump(mode="json")`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sdfleet.schemas.passthrough import ordered_for_fingerprint
from sdfleet.schemas.tasks import TEXT_TO_IMAGE


def fingerprint_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Every key of a spec's JSON form that changes what is written, flattened to dotted names."""
    flat = _flatten(data)
    if "input.passthrough_columns" in flat:
        flat["input.passthrough_columns"] = ordered_for_fingerprint(
            flat["input.passthrough_columns"]
        )
    return {
        k: v for k, v in flat.items() if not _is_operational(k) and _ADDED_KEYS.get(k, flat) != v
    }


def fingerprint(
    fields: dict[str, Any],
    input_files: list[dict[str, Any]] | None = None,
    content: dict[str, Any] | None = None,
) -> str:
    """content: `sdfleet.schemas.content.JobContent` as JSON; None leaves it out, giving the
    fingerprint jobs recorded before content had."""
    payload: dict[str, Any] = {"spec": fields, "input_files": input_files or []}
    if content is not None:
        payload["content"] = content
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# Keys that change how a job runs but not what it writes. Everything else is in the fingerprint,
# so that a resume can never mix shards made under different settings.
_OPERATIONAL_PREFIXES = (
    "name",
    "resources.",
    "output.uri",
    "input.uri",  # the listed files and their sizes are fingerprinted instead
    "input.storage_options",
    "output.storage_options",
    "output.allow_non_exclusive_commits",
    "output.shared_filesystem",
    "model.storage_options",
    "safety.storage_options",
    "safety.model_sha256",  # a guard on the weights; their hash is recorded per row either way
    "curation.storage_options",
    "engine.compile_cache",  # where compiled graphs are kept, not how images are made
)


# Keys added after outputs were made, with the default that reproduces those outputs: left out of
# the fingerprint at that default, so a job made before them still resumes after an upgrade.
_ADDED_KEYS = {
    "model.task": TEXT_TO_IMAGE,
    "model.refiner": None,
    "model.vae": None,
    "model.vae_revision": None,
    "input.image_column": None,
    "input.mask_column": None,
    "generation.strength": None,
    "generation.noise_level": None,
    "engine.vae_tiling": False,
    "model.drop_t5": False,
    "model.loras": [],
    "generation.max_sequence_length": None,
    "generation.true_cfg_scale": 1.0,
    "generation.skip_guidance_layers": None,
    "generation.skip_layer_guidance_scale": None,
    "generation.skip_layer_guidance_start": None,
    "generation.skip_layer_guidance_stop": None,
    **{
        f"curation.{k}": None
        for k in (
            "clip_model",
            "aesthetic_model",
            "nsfw_model",
            "min_clip_score",
            "min_aesthetic",
            "max_punsafe",
            "images_per_prompt",
            "max_candidates",
            "dedup_threshold",
        )
    },
    "curation.save_embeddings": False,
}


def _is_operational(key: str) -> bool:
    return any(key == p or key.startswith(p) for p in _OPERATIONAL_PREFIXES)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v and name.count(".") < 1:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def diff_fingerprint_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]
