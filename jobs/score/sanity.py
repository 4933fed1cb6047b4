"""Whether the scoring models can give figures that mean anything: tiny or untrained ones cannot."""

from __future__ import annotations

from typing import Any

from torch import nn

from sdfleet.jobs.score.inception import FeatureExtractor, InceptionV3FID

# A CLIP model under this many parameters is a test model (the smallest real one, ViT-B/32, has 151M).
MIN_REAL_CLIP_PARAMS = 10_000_000


def looks_untrained(model: nn.Module, norm_types: tuple[type[nn.Module], ...]) -> bool:
    """True when every normalisation layer still holds its initial values: a random network."""
    norms = [m for m in model.modules() if isinstance(m, norm_types)]
    if not norms:
        return False
    for m in norms:
        running_mean = getattr(
            m, "running_mean", None
        )  # batch norm's statistics; layer norm has none
        if running_mean is not None and (running_mean.any() or (m.running_var != 1).any()):
            return False
        if getattr(m, "weight", None) is not None and (
            (m.weight != 1).any() or (m.bias is not None and m.bias.any())
        ):
            return False
    return True


def model_notes(clip_info: dict[str, Any], extractor: FeatureExtractor | None) -> list[str]:
    """Why the figures of these models mean nothing; empty when they look real."""
    notes = []
    if clip_info["params"] < MIN_REAL_CLIP_PARAMS:
        notes.append(f"CLIP model is tiny ({clip_info['params']:,} parameters)")
    elif clip_info["untrained"]:
        notes.append("CLIP model looks untrained (norm layers at their initial values)")
    if extractor is None:
        return notes
    if not isinstance(extractor, InceptionV3FID):
        notes.append(
            f"FID feature extractor is the test network {extractor.arch!r}, not InceptionV3"
        )
    elif looks_untrained(extractor, (nn.BatchNorm2d,)):
        notes.append(
            "FID InceptionV3 weights look untrained (batch-norm statistics at initial values)"
        )
    return notes
