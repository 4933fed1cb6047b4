"""What every preview draws alike: its colours, and images decoded and scaled one way."""

from __future__ import annotations

import io
import math
from typing import Any

from PIL import Image

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
RED = (200, 30, 30)  # filtered (quarantined) images
ORANGE = (225, 130, 0)  # ok but flagged (safety.action score or blackout)
PLACEHOLDER = (228, 228, 228)  # a sample without an image to show


def decode(encoded: bytes) -> Image.Image:
    with Image.open(io.BytesIO(encoded)) as im:
        return im.convert("RGB")


def scale_factor(max_side: int, min_px: int, max_px: int) -> float:
    """The factor every tile of a preview is scaled by: an integer for images smaller than `min_px`
    (nearest neighbour, so tiny images stay crisp and exact), `max_px / side` for larger ones, else 1."""
    if max_side < min_px:
        return float(math.ceil(min_px / max_side))
    if max_side > max_px:
        return max_px / max_side
    return 1.0


def scale_image(image: Image.Image, factor: float) -> Image.Image:
    """Resize as the previews do: nearest neighbour for integer upscales, Lanczos otherwise."""
    if factor == 1.0:
        return image
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    integer_up = factor > 1 and float(factor).is_integer()
    return image.resize(size, Image.Resampling.NEAREST if integer_up else Image.Resampling.LANCZOS)


def nsfw_label(row: dict[str, Any]) -> str:
    """ " nsfw 0.87" to append to a label (" nsfw 1.2e-05" for a tiny score, not "0.00"), or "" when
    the row has no score."""
    score = row.get("nsfw_score")
    return f" nsfw {score:.2g}" if isinstance(score, (int, float)) and not math.isnan(score) else ""
