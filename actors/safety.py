"""Safety detectors: loaded once per actor, they score every generated image in batches.

Each detector returns, per image, an `nsfw_score` in [0, 1] and its per-class scores, the score by
its row's formula in `sdfleet.schemas.detectors` (which also holds each one's classes and default
unsafe classes). What the job does with a flagged image (score >= safety.threshold) is the action's
business, in the generator.

- nsfw-detector: GantMan's Keras models (MobileNetV2 224 or InceptionV3 299), loaded with the
  package's own `predict.load_model` and run as its `classify_nd` runs them (one call per batch,
  without the tf.data pipeline `predict()` builds each time). nsfw_score is the sum of the
  unsafe classes' probabilities (default porn + hentai + sexy; `safety.unsafe_classes` changes it).
- clip-checker: diffusers' StableDiffusionSafetyChecker (the SD 1.x checker). Its per-concept scores
  are cosine similarity minus the concept's threshold, so > 0 means the checker flags the concept;
  nsfw_score = clip(0.5 + max concept score, 0, 1) puts its own decision boundary at 0.5.
- hf-classifier: any transformers image-classification checkpoint; nsfw_score is the sum of the
  softmax probabilities of `safety.unsafe_classes` (default ["nsfw"]).
- laion-clip-nsfw: the LAION CLIP-based NSFW classifier (the filter SD2's training data went
  through, punsafe < 0.1): its head on the CLIP image embedding curation already computes, so the
  image is embedded once for both. nsfw_score = punsafe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdfleet.actors.keras_models import (
    UnsafeModelError,
    check_keras_model,
    import_tensorflow,
    keras_load_error,
)
from sdfleet.actors.model_cache import local_copy, weights_sha256
from sdfleet.schemas.detectors import DETECTORS, NO_DETECTOR, needs_clip_model_error
from sdfleet.schemas.errors import SpecError, UserError
from sdfleet.schemas.spec import SafetySpec

log = logging.getLogger("sdfleet")


@dataclass
class SafetyScore:
    nsfw_score: float
    scores: dict[str, float]

    def top_class(self, unsafe: list[str] | None) -> str:
        """The unsafe class that weighs most in this image: what it is counted as when filtered."""
        pool = {
            k: v for k, v in self.scores.items() if unsafe is None or k in unsafe
        } or self.scores
        return max(pool, key=pool.get)


class Detector:
    name: str  # its row in sdfleet.schemas.detectors
    model_sha256: str | None
    unsafe_classes: list[str] | None
    # A detector that reads curation's CLIP image embeddings (`score_embeddings`) instead of pixels.
    reads_embeddings = False

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        raise NotImplementedError

    def scored(self, scores: dict[str, float]) -> SafetyScore:
        """One image's per-class scores with the nsfw_score its table row's formula makes of them."""
        return SafetyScore(DETECTORS[self.name].nsfw_score(scores, self.unsafe_classes), scores)


def load_detector(
    spec: SafetySpec, device: str, cpu_threads: int | None = None, curator=None
) -> Detector | None:
    """cpu_threads: this worker's share of the node's CPUs, for a detector that runs on the CPU
    (nsfw-detector); None: torch's thread count. curator: the worker's `Curator`, whose CLIP
    embedding laion-clip-nsfw reads."""
    if spec.detector == NO_DETECTOR:
        return None
    spec.check_runnable()
    path = local_copy(spec.model, spec.storage_options)
    # Hash before anything is loaded: a pinned hash refuses other weights before they can run code.
    sha256 = weights_sha256(path) if Path(path).exists() else None
    if spec.model_sha256 and sha256 != spec.model_sha256:
        raise UnsafeModelError(
            f"safety.model {spec.model} has sha256 {sha256 or '(not a local file: a hub id)'}, "
            f"not the pinned safety.model_sha256 {spec.model_sha256}; check where the weights "
            "came from, or update the pin"
        )
    row = DETECTORS[spec.detector]
    cls = DETECTOR_CLASSES[row.cls]
    if row.needs_clip_model and curator is None:
        raise SpecError(needs_clip_model_error(spec.detector))
    try:
        extra = curator.clip if row.needs_clip_model else cpu_threads
        detector = cls(path, spec.resolved_unsafe_classes(), device, extra)
    except UserError as e:
        if path == spec.model:
            raise
        # Its refusal names the node's copy; the user knows the weights by what the spec says.
        raise type(e)(str(e).replace(path, spec.model)) from e
    detector.model_sha256 = sha256
    log.info(
        "safety: %s from %s (sha256 %s)",
        spec.detector,
        spec.model,
        (detector.model_sha256 or "?")[:12],
    )
    return detector


def _check_classes(detector: str, unsafe: list[str] | None, known) -> None:
    if unsafe is None:
        return
    unknown = [c for c in unsafe if c not in known]
    if unknown:
        raise SpecError(
            f"safety.unsafe_classes has {unknown[0]!r}, which {detector} does not output; "
            f"its classes are {', '.join(known)}"
        )


class NsfwDetector(Detector):
    name = "nsfw-detector"

    def __init__(
        self, path: str, unsafe: list[str] | None, device: str, cpu_threads: int | None = None
    ):
        tf = import_tensorflow()
        # And to this worker's share of the node's CPUs, not all of them: several workers per node
        # would otherwise oversubscribe every core. Not torch's thread count: Ray sets
        # OMP_NUM_THREADS=1 in a GPU actor, which would leave the detector one core of the node's share.
        import torch

        try:
            tf.config.threading.set_intra_op_parallelism_threads(
                cpu_threads or torch.get_num_threads()
            )
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TensorFlow was already initialised in this process; its pools are fixed
        tf.get_logger().setLevel(
            logging.ERROR
        )  # "model was not compiled": inference needs no compile
        from nsfw_detector import predict

        if not Path(path).exists():
            raise FileNotFoundError(f"safety.model {path} does not exist")
        check_keras_model(path)
        try:
            self.model = predict.load_model(path)
        except Exception as e:  # a config or weights Keras cannot read: one line, not a traceback
            raise keras_load_error(path, e) from e
        self.size = tuple(self.model.input_shape[1:3])  # (224, 224) or (299, 299)
        self.unsafe_classes = unsafe
        _check_classes(self.name, unsafe, DETECTORS[self.name].classes)

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        from PIL import Image

        # Nearest-neighbour resize, as the package's own image loader does, then [0, 1] floats.
        batch = np.stack(
            [
                np.asarray(Image.fromarray(im).resize(self.size[::-1], Image.NEAREST))
                for im in images
            ]
        )
        # classify_nd's math (its class order is the table row's), through predict_on_batch:
        # predict() builds a tf.data pipeline per call, 15% more CPU per image for the same numbers.
        preds = self.model.predict_on_batch(batch.astype(np.float32) / 255.0)
        classes = DETECTORS[self.name].classes
        return [self.scored({c: float(v) for c, v in zip(classes, row)}) for row in preds]


class ClipChecker(Detector):
    name = "clip-checker"

    def __init__(
        self, path: str, unsafe: list[str] | None, device: str, cpu_threads: int | None = None
    ):
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.checker = StableDiffusionSafetyChecker.from_pretrained(path, use_safetensors=True)
        self.checker = self.checker.to(device, self.dtype).eval()
        self.processor = CLIPImageProcessor.from_pretrained(path)
        self.concepts = [f"concept_{i:02d}" for i in range(self.checker.concept_embeds.shape[0])]
        self.unsafe_classes = unsafe
        _check_classes(self.name, unsafe, self.concepts)

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        c = self.checker
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(
            self.device, self.dtype
        )
        with torch.inference_mode():
            embeds = c.visual_projection(c.vision_model(pixels)[1])
            # The checker's own rule (as in its forward_onnx): a special-care hit raises every concept by 0.01.
            special = cosine_distance(embeds, c.special_care_embeds) - c.special_care_embeds_weights
            adjustment = (special > 0).any(dim=1, keepdim=True).to(embeds.dtype) * 0.01
            concept = (
                (cosine_distance(embeds, c.concept_embeds) - c.concept_embeds_weights + adjustment)
                .float()
                .cpu()
            )
        return [
            self.scored({name: float(v) for name, v in zip(self.concepts, row)})
            for row in concept.numpy()
        ]


class HfClassifier(Detector):
    name = "hf-classifier"

    def __init__(
        self, path: str, unsafe: list[str] | None, device: str, cpu_threads: int | None = None
    ):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        # No trust_remote_code: only architectures that ship with transformers are loaded.
        self.model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True)
        self.model = self.model.to(device, self.dtype).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.unsafe_classes = unsafe
        _check_classes(self.name, unsafe, self.labels)

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            probs = self.model(**inputs).logits.float().softmax(-1).cpu().numpy()
        return [
            self.scored({label: float(p) for label, p in zip(self.labels, row)}) for row in probs
        ]


class LaionClipNsfw(Detector):
    name = "laion-clip-nsfw"
    reads_embeddings = True

    def __init__(self, path: str, unsafe: list[str] | None, device: str, clip):
        from sdfleet.actors.curation import Head

        self.clip = clip
        self.head = Head(path, "nsfw", device, clip.embedding_size, "safety.model")
        self.unsafe_classes = unsafe
        _check_classes(self.name, unsafe, DETECTORS[self.name].classes)

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        """Embeds the images itself: for callers without curation's embeddings (benches)."""
        return self.score_embeddings(
            self.clip.normalized_image_embeds(images).float().cpu().numpy()
        )

    def score_embeddings(self, normalized: np.ndarray) -> list[SafetyScore]:
        """From L2-normalized CLIP image embeddings, one row per image."""
        import torch

        punsafe = (
            self.head(torch.from_numpy(np.asarray(normalized)).to(self.head.device))
            .float()
            .cpu()
            .tolist()
        )
        return [self.scored({"unsafe": p, "safe": 1.0 - p}) for p in punsafe]


# The classes the detector table (sdfleet.schemas.detectors) names, by name.
DETECTOR_CLASSES = {
    cls.__name__: cls for cls in (NsfwDetector, ClipChecker, HfClassifier, LaionClipNsfw)
}
