"""Detector cost per image for the real architectures (random weights: the cost is the same).

    .venv/bin/python bench/safety.py [--batch 8] [--repeats 3] [--device cpu|cuda]

Each detector is built at full size, written in its real format and loaded through the same
`load_detector` path a job uses, then timed on 512x512 images (what SD2-base produces).
nsfw-detector always runs on the CPU (TensorFlow is kept off the GPU so torch owns its memory).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from sdfleet.actors.safety import load_detector
from sdfleet.schemas.spec import SafetySpec


def keras_model(kind: str, path: Path) -> Path:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    apps = tf.keras.applications
    if kind == "mobilenet_v2_140_224":
        model = apps.MobileNetV2(input_shape=(224, 224, 3), alpha=1.4, weights=None, classes=5)
    else:
        model = apps.InceptionV3(input_shape=(299, 299, 3), weights=None, classes=5)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # .h5 is nsfw-detector's format, "legacy" to Keras
        model.save(path, save_format="h5")
    return path


def clip_checker(path: Path) -> Path:
    """The SD 1.x safety checker: CLIP ViT-L/14 vision tower, projection 768."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 768, "num_hidden_layers": 1, "num_attention_heads": 12},
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        projection_dim=768,
    )
    StableDiffusionSafetyChecker(config).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(path)
    return path


def vit_classifier(path: Path) -> Path:
    """ViT-B/16 at 224, the architecture of the common NSFW classifiers on the hub."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor().save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    parser.add_argument("--only", nargs="*", help="subset of: mobilenet inception clip vit")
    args = parser.parse_args()
    images = [
        np.random.RandomState(i).randint(0, 256, (512, 512, 3), dtype=np.uint8)
        for i in range(args.batch)
    ]
    cases = {
        "mobilenet": (
            "nsfw-detector",
            "MobileNetV2 1.4 224",
            lambda d: keras_model("mobilenet_v2_140_224", d / "m.h5"),
        ),
        "inception": (
            "nsfw-detector",
            "InceptionV3 299",
            lambda d: keras_model("inception_v3", d / "i.h5"),
        ),
        "clip": (
            "clip-checker",
            "CLIP ViT-L/14 safety checker",
            lambda d: clip_checker(d / "clip"),
        ),
        "vit": ("hf-classifier", "ViT-B/16 224", lambda d: vit_classifier(d / "vit")),
    }
    figures = {}
    print(f"{'detector':14} {'architecture':30} {'device':6} {'batch':>5} {'ms/image':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (detector, arch, build) in cases.items():
            if args.only and name not in args.only:
                continue
            path = build(Path(tmp))
            det = load_detector(SafetySpec(detector=detector, model=str(path)), args.device)
            det.score(images[:2])  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                det.score(images)
                times.append(time.perf_counter() - t0)
            device = "cpu" if detector == "nsfw-detector" else args.device
            print(
                f"{detector:14} {arch:30} {device:6} {args.batch:5d} {1000 * min(times) / args.batch:9.1f}",
                flush=True,
            )
            figures[name] = {
                "detector": detector,
                "device": device,
                "ms_per_image": round(1000 * min(times) / args.batch, 2),
            }
    print(json.dumps(figures))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
