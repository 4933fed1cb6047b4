"""What each safety detector (`safety.detector`) is: the class that runs it, the classes it
outputs and counts as unsafe by default, its weights' format, what else it needs, and how its
per-class scores make one `nsfw_score`. The one owner of the detector concept: the spec
validates against it, the driver checks weights with it, `sdfleet.actors.safety` loads by it.

No torch or tensorflow here: the spec and `sdfleet plan` read it on a laptop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


def summed_score(scores: Mapping[str, float], unsafe: Sequence[str] | None) -> float:
    """The unsafe classes' probabilities added up, at most 1 (the classifiers' nsfw_score)."""
    return min(1.0, sum(scores[c] for c in unsafe or []))


def margin_score(scores: Mapping[str, float], unsafe: Sequence[str] | None) -> float:
    """The CLIP checker's: its concept scores are cosine minus the concept's threshold (> 0 flags
    it), so 0.5 + the largest counted one, clipped to [0, 1], puts its own boundary at 0.5.
    unsafe None: every concept counts."""
    x = 0.5 + max(scores[k] for k in (unsafe or scores))
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


@dataclass(frozen=True)
class Detector:
    name: str
    # The class in sdfleet.actors.safety that loads and runs it (None: no detector runs).
    cls: str | None
    # The classes it outputs, where fixed (None: its checkpoint's own labels or concepts).
    classes: tuple[str, ...] | None
    # The classes whose scores make nsfw_score when safety.unsafe_classes is not set
    # (None: every class).
    unsafe_classes: tuple[str, ...] | None
    # What safety.model must hold, as said where it is missing.
    weights: str
    # Its weights are a single .safetensors file (the driver refuses anything else).
    safetensors_file: bool
    # It reads the CLIP image embedding curation computes, so curation.clip_model must be set.
    needs_clip_model: bool
    nsfw_score: Callable[[Mapping[str, float], Sequence[str] | None], float]
    # Its weights are a Keras model (.h5 file or SavedModel folder): checked on the driver too.
    keras_model: bool = False

    def default_unsafe_classes(self) -> list[str] | None:
        return None if self.unsafe_classes is None else list(self.unsafe_classes)


NO_DETECTOR = "none"

DETECTORS: dict[str, Detector] = {
    d.name: d
    for d in (
        # GantMan's Keras models; class order is its classify_nd's.
        Detector(
            "nsfw-detector",
            "NsfwDetector",
            ("drawings", "hentai", "neutral", "porn", "sexy"),
            ("porn", "hentai", "sexy"),
            "path or s3:// URI of its weights (a Keras .h5 file or SavedModel folder)",
            safetensors_file=False,
            needs_clip_model=False,
            nsfw_score=summed_score,
            keras_model=True,
        ),
        # diffusers' StableDiffusionSafetyChecker (the SD 1.x checker): flags on any concept.
        Detector(
            "clip-checker",
            "ClipChecker",
            None,
            None,
            "path, s3:// URI or hub id of its weights",
            safetensors_file=False,
            needs_clip_model=False,
            nsfw_score=margin_score,
        ),
        # Any transformers image classifier; an NSFW classifier's labels are usually normal/nsfw.
        Detector(
            "hf-classifier",
            "HfClassifier",
            None,
            ("nsfw",),
            "path, s3:// URI or hub id of its weights",
            safetensors_file=False,
            needs_clip_model=False,
            nsfw_score=summed_score,
        ),
        # LAION's CLIP-based NSFW head: punsafe, on curation's CLIP image embedding.
        Detector(
            "laion-clip-nsfw",
            "LaionClipNsfw",
            ("unsafe", "safe"),
            ("unsafe",),
            "path or s3:// URI of its head (a .safetensors file)",
            safetensors_file=True,
            needs_clip_model=True,
            nsfw_score=summed_score,
        ),
        Detector(
            NO_DETECTOR,
            None,
            None,
            None,
            "",
            safetensors_file=False,
            needs_clip_model=False,
            nsfw_score=summed_score,
        ),
    )
}

DETECTOR_NAMES = tuple(DETECTORS)


def needs_clip_model_error(detector: str) -> str:
    """What a detector that reads curation's CLIP embedding says when curation.clip_model is unset."""
    return (
        f"safety.detector={detector} reads the CLIP image embedding curation computes: set "
        "curation.clip_model to the CLIP checkpoint its head was trained on (ViT-L/14 for LAION's)"
    )
