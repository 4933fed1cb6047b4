"""Which weight files sdfleet loads: safetensors only, the one rule for every model it reads.

Pickle formats (.bin, .pt, .ckpt ...) run code when they load, so a component, head or detector
whose weights come only as pickles is refused before any worker starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")


def is_safetensors(name: str) -> bool:
    return name.endswith(SAFETENSORS)


def pickles_only(names: Iterable[str]) -> list[str]:
    """The pickle files among one component's file names when it has no safetensors file (it
    cannot be loaded safely); [] when it has safetensors or no weights at all."""
    names = list(names)
    if any(is_safetensors(n) for n in names):
        return []
    return [n for n in names if PurePosixPath(n).suffix in PICKLE_SUFFIXES]
