"""Safety detectors: loaded once per actor, they score every generated image in batches.

Each detector returns, per image, an `nsfw_score` in [0, 1] and its per-class scores. What the job
does with a flagged image (score >= safety.threshold) is the action's business, in the generator.

- nsfw-detector: GantMan's Keras models (MobileNetV2 224 or InceptionV3 299), loaded with the
  package's own `predict.load_model` and run with its `classify_nd`. nsfw_score is the sum of the
  unsafe classes' probabilities (default porn + hentai + sexy; `safety.unsafe_classes` changes it).
- clip-checker: diffusers' StableDiffusionSafetyChecker (the SD 1.x checker). Its per-concept scores
  are cosine similarity minus the concept's threshold, so > 0 means the checker flags the concept;
  nsfw_score = clip(0.5 + max concept score, 0, 1) puts its own decision boundary at 0.5.
- hf-classifier: any transformers image-classification checkpoint; nsfw_score is the sum of the
  softmax probabilities of `safety.unsafe_classes` (default ["nsfw"]).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdfleet.actors.storage import local_copy, weights_sha256
from sdfleet.schemas.spec import SafetySpec

log = logging.getLogger("sdfleet")

NSFW_DETECTOR_CLASSES = ("drawings", "hentai", "neutral", "porn", "sexy")


@dataclass
class SafetyScore:
    nsfw_score: float
    scores: dict[str, float]

    def top_class(self, unsafe: list[str] | None) -> str:
        """The unsafe class that weighs most in this image: what it is counted as when filtered."""
        pool = {k: v for k, v in self.scores.items() if unsafe is None or k in unsafe} or self.scores
        return max(pool, key=pool.get)


class Detector:
    name: str
    model_sha256: str | None
    unsafe_classes: list[str] | None

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        raise NotImplementedError


def load_detector(spec: SafetySpec, device: str) -> Detector | None:
    if spec.detector == "none":
        return None
    spec.check_runnable()
    path = local_copy(spec.model, spec.storage_options)
    cls = {"nsfw-detector": NsfwDetector, "clip-checker": ClipChecker, "hf-classifier": HfClassifier}[spec.detector]
    detector = cls(path, spec.resolved_unsafe_classes(), device)
    detector.model_sha256 = weights_sha256(path) if Path(path).exists() else None
    log.info("safety: %s from %s (sha256 %s)", spec.detector, spec.model, (detector.model_sha256 or "?")[:12])
    return detector


def _check_classes(detector: str, unsafe: list[str] | None, known) -> None:
    if unsafe is None:
        return
    unknown = [c for c in unsafe if c not in known]
    if unknown:
        raise ValueError(
            f"safety.unsafe_classes has {unknown[0]!r}, which {detector} does not output; "
            f"its classes are {', '.join(known)}"
        )


class NsfwDetector(Detector):
    name = "nsfw-detector"

    def __init__(self, path: str, unsafe: list[str] | None, device: str):
        # nsfw-detector 1.1.1 needs Keras 2 (tf-keras): this must be set before TensorFlow is imported.
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        # TensorFlow maps almost all GPU memory at start: keep it off the GPU so torch owns it.
        tf.config.set_visible_devices([], "GPU")
        # And to this worker's share of the node's CPUs (torch's thread count), not all of them:
        # several workers per node would otherwise oversubscribe every core.
        import torch

        try:
            tf.config.threading.set_intra_op_parallelism_threads(torch.get_num_threads())
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass  # TensorFlow was already initialised in this process; its pools are fixed
        tf.get_logger().setLevel(logging.ERROR)  # "model was not compiled": inference needs no compile
        from nsfw_detector import predict

        self._quiet = tf.keras.utils.disable_interactive_logging
        if not Path(path).exists():
            raise FileNotFoundError(f"safety.model {path} does not exist")
        self._predict = predict
        self.model = predict.load_model(path)
        self.size = tuple(self.model.input_shape[1:3])  # (224, 224) or (299, 299)
        self.unsafe_classes = unsafe
        _check_classes(self.name, unsafe, NSFW_DETECTOR_CLASSES)

    def score(self, images: list[np.ndarray]) -> list[SafetyScore]:
        from PIL import Image

        # classify_nd's predict() prints a progress bar per call unless told otherwise; Keras keeps
        # that switch per thread, and scoring runs on the generator's post-processing thread.
        self._quiet()
        # Nearest-neighbour resize, as the package's own image loader does, then [0, 1] floats.
        batch = np.stack([np.asarray(Image.fromarray(im).resize(self.size[::-1], Image.NEAREST)) for im in images])
        probs = self._predict.classify_nd(self.model, batch.astype(np.float32) / 255.0)
        unsafe = self.unsafe_classes or []
        return [SafetyScore(min(1.0, sum(p[c] for c in unsafe)), p) for p in probs]


class ClipChecker(Detector):
    name = "clip-checker"

    def __init__(self, path: str, unsafe: list[str] | None, device: str):
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
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(self.device, self.dtype)
        with torch.inference_mode():
            embeds = c.visual_projection(c.vision_model(pixels)[1])
            # The checker's own rule (as in its forward_onnx): a special-care hit raises every concept by 0.01.
            special = cosine_distance(embeds, c.special_care_embeds) - c.special_care_embeds_weights
            adjustment = (special > 0).any(dim=1, keepdim=True).to(embeds.dtype) * 0.01
            concept = (cosine_distance(embeds, c.concept_embeds) - c.concept_embeds_weights + adjustment).float().cpu()
        out = []
        for row in concept.numpy():
            scores = {name: float(v) for name, v in zip(self.concepts, row)}
            counted = [scores[k] for k in (self.unsafe_classes or self.concepts)]
            out.append(SafetyScore(float(np.clip(0.5 + max(counted), 0.0, 1.0)), scores))
        return out


class HfClassifier(Detector):
    name = "hf-classifier"

    def __init__(self, path: str, unsafe: list[str] | None, device: str):
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
        out = []
        for row in probs:
            scores = {label: float(p) for label, p in zip(self.labels, row)}
            out.append(SafetyScore(min(1.0, sum(scores[c] for c in self.unsafe_classes or [])), scores))
        return out
