"""FID of each sweep point against one folder of reference images, with torchmetrics' FID."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from concurrent.futures import Executor

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from sdfleet.actors.storage import Storage
from sdfleet.jobs.score import DEFAULT_FID_SIZE, ScoreError
from sdfleet.jobs.score.inception import FeatureExtractor
from sdfleet.schemas import layout

log = logging.getLogger("sdfleet")

# The reference half of a metric's state: copied into each sweep point's metric, not recomputed.
REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def fid_array(im: Image.Image, size: int = DEFAULT_FID_SIZE) -> np.ndarray:
    """PIL image -> uint8 array (3, size, size): RGB, centre-cropped square, PIL bicubic resize."""
    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def fid_image(data: bytes, size: int = DEFAULT_FID_SIZE) -> np.ndarray:
    """Encoded image bytes -> the uint8 (3, size, size) array the feature extractor takes."""
    with Image.open(io.BytesIO(data)) as im:
        return fid_array(im, size)


def list_reference_images(storage: Storage) -> list[str]:
    """Every image directly in the folder, by extension in either case."""
    names = set()
    for ext in layout.MIME_TYPES:
        for pattern in (f"*.{ext}", f"*.{ext.upper()}"):
            names.update(storage.list(pattern))
    return sorted(names)


class SweepFID:
    """One FrechetInceptionDistance per sweep point, all against the same reference images.

    The reference statistics are computed once; generated images are buffered per point and fed
    to that point's metric a batch at a time.
    """

    def __init__(self, extractor: FeatureExtractor, device: str, batch_size: int):
        self.extractor = extractor
        self.device = device
        self.batch_size = batch_size
        self.reference = self._new_metric()
        self.reference_images = 0
        self.metrics: dict[tuple, FrechetInceptionDistance] = {}
        self.pending: dict[tuple, list[np.ndarray]] = defaultdict(list)

    def read_reference(self, storage: Storage, size: int, pool: Executor) -> None:
        """Feed every image of the reference folder, decoded on `pool`, into the reference statistics."""
        names = list_reference_images(storage)
        if len(names) < 2:
            raise ScoreError(
                f"--reference {storage.url()}: found {len(names)} images "
                f"(*.{'|'.join(layout.MIME_TYPES)}); FID needs at least 2"
            )
        for i in range(0, len(names), self.batch_size):
            arrays = list(
                pool.map(
                    lambda name: fid_image(storage.read_bytes(name), size),
                    names[i : i + self.batch_size],
                )
            )
            self._update(self.reference, arrays, real=True)
        self.reference_images = len(names)
        log.info("reference: %d images from %s", len(names), storage.url())

    def add(self, point: tuple, array: np.ndarray) -> None:
        self.pending[point].append(array)
        if len(self.pending[point]) >= self.batch_size:
            self._flush(point)

    def compute(self, point: tuple) -> float:
        self._flush(point)
        # float64 eigenvalues on the CPU, the same on every device
        return float(self.metrics[point].to("cpu").compute())

    def _flush(self, point: tuple) -> None:
        arrays = self.pending.pop(point, None)
        if not arrays:
            return
        if point not in self.metrics:
            self.metrics[point] = self._new_metric()
            for state in REAL_STATES:
                setattr(self.metrics[point], state, getattr(self.reference, state).clone())
        self._update(self.metrics[point], arrays, real=False)

    def _new_metric(self) -> FrechetInceptionDistance:
        return FrechetInceptionDistance(feature=self.extractor, reset_real_features=False).to(
            self.device
        )

    def _update(
        self, metric: FrechetInceptionDistance, arrays: list[np.ndarray], real: bool
    ) -> None:
        with torch.no_grad():
            metric.update(torch.from_numpy(np.stack(arrays)).to(self.device), real=real)
