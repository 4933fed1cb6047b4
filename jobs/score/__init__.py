"""`sdfleet score`: CLIP score per image and FID per sweep point of a finished (or partial) output.

    sdfleet score OUTPUT --clip-model SRC --reference DIR --fid-weights FILE [--out NAME]
                         [--batch-size N] [--device cpu|cuda] [--fid-size 299] [--note TEXT]

What it computes, the way the Stable Diffusion model cards plot it (FID against CLIP score, one
point per classifier-free guidance scale):

- **CLIP score** of every `ok` image against its own prompt: ``max(100 * cos(E_img, E_txt), 0)``,
  exactly as torchmetrics' ``CLIPScore`` defines it, computed with a transformers ``CLIPModel`` and
  ``CLIPProcessor`` (prompts longer than the text encoder's context are truncated, as there).
- **FID** of each sweep point's images against a folder of reference images (e.g. the COCO-2017
  validation images), with torchmetrics' ``FrechetInceptionDistance`` (float64 statistics,
  ``Tr(sqrt(S1 S2))`` from eigenvalues) and the 2048-d pool features of the FID InceptionV3 (the
  TensorFlow ``2015-12-05`` graph as ported by pytorch-fid / torch-fidelity). torchmetrics' own
  extractor would download its weights, so ``InceptionV3FID`` below is a torchvision-free rebuild of
  that network whose parameter names match the published ``pt_inception-2015-12-05-6726825d.pth``;
  its weights are read from a local or ``s3://`` **safetensors** file (``--fid-weights``).

  One-off conversion of the official weights, in a trusted environment (the ``.pth`` is a pickle;
  ``weights_only=True`` refuses anything but tensors)::

      python - <<'EOF'
      import torch, safetensors.torch
      sd = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
      safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "pt_inception-2015-12-05.safetensors")
      EOF

  (The file is pytorch-fid's release asset; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
  holds the same tensors.) Loading checks that every parameter of the network is present.

Images are grouped into sweep points by ``guidance_scale`` and every other axis in the job's
``spec.sweep.axes`` (seeds are not an axis: all seeds of a point count together). Every image, the
generated ones and the reference ones alike, is converted to RGB, centre-cropped to a square and
resized with PIL bicubic to ``--fid-size`` (default 299, Inception's input, so the network itself
resizes nothing). FID depends on such choices and on the number of images; compare figures made
with the same settings only.

Written into OUTPUT (through Storage, so ``s3://`` works), with NAME = ``--out`` (default ``scores``):

- ``NAME.parquet``: one row per scored image: key, shard_id, sample_id, prompt_id, seed, guidance_scale,
  the other sweep columns, clip_score, safety_flagged.
- ``NAME_summary.json``: per sweep point n, mean/std CLIP score and FID, plus provenance (models and
  their hashes, reference count, settings) and ``notes``.
- ``NAME_fid_vs_clip.png``: FID against mean CLIP score, each point labelled with its guidance scale.

Figures from tiny or untrained models mean nothing, so a loud note goes into the summary and onto the
plot when the CLIP model or the feature extractor is tiny (by parameter count or architecture) or
untrained (normalisation layers still at their initial values), and ``--note`` adds any text of yours.

Only shards committed under the job's fingerprint are scored; an incomplete dataset is scored as far
as it goes and says so (``dataset_complete: false``).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import tarfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

from schemas.rows import STATUS_OK
from schemas.spec import SpecError

log = logging.getLogger("sdfleet")


class ScoreError(SpecError):
    """Arguments or inputs that cannot be scored; the CLI prints the message and exits 1."""


IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
DEFAULT_OUT = "scores"
DEFAULT_FID_SIZE = 299
# A CLIP model under this many parameters is a test model (the smallest real one, ViT-B/32, has 151M).
MIN_REAL_CLIP_PARAMS = 10_000_000
LOUD_NOTE = "TINY/RANDOM MODELS - FIGURES MEAN NOTHING"
# safetensors metadata key naming the feature extractor's architecture; absent -> the FID InceptionV3.
ARCH_METADATA_KEY = "sdfleet_feature_extractor"
ARCH_INCEPTION = "inception-v3-fid"
ARCH_TINY = "tiny-conv"


# --------------------------------------------------------------------------- feature extractors
# Built lazily: this module is imported by the CLI, which must not import torch to parse arguments.

def _build_networks():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class BasicConv2d(nn.Module):
        """conv (no bias) -> batch norm (eps 1e-3, TensorFlow's) -> ReLU; parameter names `conv`, `bn`."""

        def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def _avg_pool(x):  # TensorFlow's average pool ignores the zero padding
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    def _max_pool_same(x):
        return F.max_pool2d(x, 3, stride=1, padding=1)

    def _max_pool_down(x):
        return F.max_pool2d(x, 3, stride=2)

    class Mixed(nn.Module):
        """One Inception block: parallel branches, concatenated along channels.

        A branch is (pool or None, [conv names run in sequence], [conv names applied in parallel to
        the sequence's output and concatenated]). Convs are registered under the names the published
        weights use, e.g. `Mixed_5b.branch5x5_2.conv.weight`.
        """

        def __init__(self, convs: dict[str, tuple], branches: list[tuple]):
            super().__init__()
            for name, args in convs.items():
                self.add_module(name, BasicConv2d(*args))
            self.branches = branches

        def forward(self, x):
            outs = []
            for pool, seq, split in self.branches:
                y = pool(x) if pool else x
                for name in seq:
                    y = getattr(self, name)(y)
                if split:
                    y = torch.cat([getattr(self, name)(y) for name in split], 1)
                outs.append(y)
            return torch.cat(outs, 1)

    def block_a(cin, pool_features):
        return Mixed({
            "branch1x1": (cin, 64, 1),
            "branch5x5_1": (cin, 48, 1), "branch5x5_2": (48, 64, 5, 1, 2),
            "branch3x3dbl_1": (cin, 64, 1), "branch3x3dbl_2": (64, 96, 3, 1, 1), "branch3x3dbl_3": (96, 96, 3, 1, 1),
            "branch_pool": (cin, pool_features, 1),
        }, [(None, ["branch1x1"], None), (None, ["branch5x5_1", "branch5x5_2"], None),
            (None, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], None),
            (_avg_pool, ["branch_pool"], None)])

    def block_b(cin):
        return Mixed({
            "branch3x3": (cin, 384, 3, 2),
            "branch3x3dbl_1": (cin, 64, 1), "branch3x3dbl_2": (64, 96, 3, 1, 1), "branch3x3dbl_3": (96, 96, 3, 2),
        }, [(None, ["branch3x3"], None), (None, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], None),
            (_max_pool_down, [], None)])

    def block_c(cin, c7):
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        return Mixed({
            "branch1x1": (cin, 192, 1),
            "branch7x7_1": (cin, c7, 1), "branch7x7_2": (c7, c7, *row), "branch7x7_3": (c7, 192, *col),
            "branch7x7dbl_1": (cin, c7, 1), "branch7x7dbl_2": (c7, c7, *col), "branch7x7dbl_3": (c7, c7, *row),
            "branch7x7dbl_4": (c7, c7, *col), "branch7x7dbl_5": (c7, 192, *row),
            "branch_pool": (cin, 192, 1),
        }, [(None, ["branch1x1"], None), (None, ["branch7x7_1", "branch7x7_2", "branch7x7_3"], None),
            (None, [f"branch7x7dbl_{i}" for i in range(1, 6)], None), (_avg_pool, ["branch_pool"], None)])

    def block_d(cin):
        return Mixed({
            "branch3x3_1": (cin, 192, 1), "branch3x3_2": (192, 320, 3, 2),
            "branch7x7x3_1": (cin, 192, 1), "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
            "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)), "branch7x7x3_4": (192, 192, 3, 2),
        }, [(None, ["branch3x3_1", "branch3x3_2"], None),
            (None, ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"], None),
            (_max_pool_down, [], None)])

    def block_e(cin, pool):
        # The FID graph's last block pools with max where the paper (and torchvision) use average.
        return Mixed({
            "branch1x1": (cin, 320, 1),
            "branch3x3_1": (cin, 384, 1), "branch3x3_2a": (384, 384, (1, 3), 1, (0, 1)),
            "branch3x3_2b": (384, 384, (3, 1), 1, (1, 0)),
            "branch3x3dbl_1": (cin, 448, 1), "branch3x3dbl_2": (448, 384, 3, 1, 1),
            "branch3x3dbl_3a": (384, 384, (1, 3), 1, (0, 1)), "branch3x3dbl_3b": (384, 384, (3, 1), 1, (1, 0)),
            "branch_pool": (cin, 192, 1),
        }, [(None, ["branch1x1"], None), (None, ["branch3x3_1"], ["branch3x3_2a", "branch3x3_2b"]),
            (None, ["branch3x3dbl_1", "branch3x3dbl_2"], ["branch3x3dbl_3a", "branch3x3dbl_3b"]),
            (pool, ["branch_pool"], None)])

    class _Uint8Extractor(nn.Module):
        """torchmetrics' contract for a custom FID feature: uint8 (N, 3, H, W) in, (N, num_features) out."""

        input_size: int
        num_features: int

        def forward(self, x):
            if x.dtype != torch.uint8:
                raise TypeError(f"expected uint8 images, got {x.dtype}")
            x = x.float()
            if x.shape[-2:] != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False, antialias=True)
            return self.features((x - 128) / 128)

        def train(self, mode: bool = True):  # batch norm stays in inference mode, always
            return super().train(False)

    class InceptionV3FID(_Uint8Extractor):
        """The FID InceptionV3 (TF 2015-12-05 graph), 2048-d pool features. Parameter names match
        pytorch-fid's pt_inception-2015-12-05 weights; `fc` (1008 classes) is loaded but unused."""

        arch = ARCH_INCEPTION
        input_size = 299
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, 2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, 1, 1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
            self.Mixed_5b = block_a(192, 32)
            self.Mixed_5c = block_a(256, 64)
            self.Mixed_5d = block_a(288, 64)
            self.Mixed_6a = block_b(288)
            self.Mixed_6b = block_c(768, 128)
            self.Mixed_6c = block_c(768, 160)
            self.Mixed_6d = block_c(768, 160)
            self.Mixed_6e = block_c(768, 192)
            self.Mixed_7a = block_d(768)
            self.Mixed_7b = block_e(1280, _avg_pool)
            self.Mixed_7c = block_e(2048, _max_pool_same)
            self.fc = nn.Linear(2048, 1008)

        def features(self, x):
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = _max_pool_down(x)
            x = _max_pool_down(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    class TinyFeatureExtractor(_Uint8Extractor):
        """For tests only: two strided convs on 32x32 input, 16 features. Same interface as InceptionV3FID."""

        arch = ARCH_TINY
        input_size = 32
        num_features = 16

        def __init__(self):
            super().__init__()
            self.conv1 = BasicConv2d(3, 8, 3, 2, 1)
            self.conv2 = BasicConv2d(8, 16, 3, 2, 1)

        def features(self, x):
            return torch.flatten(F.adaptive_avg_pool2d(self.conv2(self.conv1(x)), 1), 1)

    return {ARCH_INCEPTION: InceptionV3FID, ARCH_TINY: TinyFeatureExtractor}


_NETWORKS: dict[str, type] | None = None


def feature_extractor_class(arch: str = ARCH_INCEPTION):
    """The nn.Module class for an architecture name (`inception-v3-fid` or, for tests, `tiny-conv`)."""
    global _NETWORKS
    if _NETWORKS is None:
        _NETWORKS = _build_networks()
    if arch not in _NETWORKS:
        raise ScoreError(f"unknown feature extractor architecture {arch!r}; known: {', '.join(_NETWORKS)}")
    return _NETWORKS[arch]


def _local_file(uri: str, storage_options: dict[str, Any] | None = None) -> Path:
    from actors.storage import cached_copy, is_remote

    return Path(cached_copy(uri, storage_options)) if is_remote(uri) else Path(uri).expanduser()


def load_feature_extractor(weights: str, device: str = "cpu", storage_options: dict[str, Any] | None = None):
    """The FID feature extractor with its weights from a safetensors file (local path or s3://).

    The architecture is InceptionV3FID unless the file's safetensors metadata names another
    (``sdfleet_feature_extractor: tiny-conv``, written by ``actors.tiny.write_tiny_inception``).
    Every parameter and buffer of the network must be in the file (``num_batches_tracked`` aside),
    and nothing else may be.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _local_file(weights, storage_options)
    if path.suffix != ".safetensors":
        raise ScoreError(f"--fid-weights {weights}: expected a .safetensors file (sdfleet never unpickles weights); "
                         "see `python -m jobs.score --help` for converting the official .pth once")
    with safe_open(str(path), framework="pt") as f:
        arch = (f.metadata() or {}).get(ARCH_METADATA_KEY, ARCH_INCEPTION)
    net = feature_extractor_class(arch)()
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ScoreError(
            f"--fid-weights {weights} does not fit the {arch} network: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    net.requires_grad_(False)
    return net.eval().to(device)


def _untrained_norms(model, kinds: tuple) -> bool:
    """True when every normalisation layer still holds its initial values: a random network."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, kinds)]
    if not norms:
        return False
    for m in norms:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None and (m.running_mean.any() or (m.running_var != 1).any()):
                return False
        if getattr(m, "weight", None) is not None and ((m.weight != 1).any() or (m.bias is not None and m.bias.any())):
            return False
    return True


# --------------------------------------------------------------------------------- images


def fid_array(im, size: int = DEFAULT_FID_SIZE):
    """PIL image -> uint8 array (3, size, size): RGB, centre-cropped square, PIL bicubic resize."""
    import numpy as np
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def fid_image(data: bytes, size: int = DEFAULT_FID_SIZE):
    """Encoded image bytes -> the uint8 (3, size, size) array the feature extractor takes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return fid_array(im, size)


def _decode(data: bytes, image_processor, fid_size: int | None):
    """Encoded image -> (CLIP pixel_values (3, h, w), FID uint8 array or None); runs in worker threads."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    pixels = image_processor(images=[rgb], return_tensors="pt")["pixel_values"][0]
    return pixels, (fid_array(rgb, fid_size) if fid_size else None)


def list_reference_images(storage) -> list[str]:
    names = set()
    for ext in IMAGE_EXTS:
        for pattern in (f"*.{ext}", f"*.{ext.upper()}"):
            names.update(storage.list(pattern))
    return sorted(names)


# ---------------------------------------------------------------------------------- scoring


def _shards_to_score(storage, job: dict[str, Any]) -> tuple[list[str], bool]:
    from jobs.finalize import survey

    s = survey(storage, job)
    return sorted(s.committed), s.complete


def _iter_ok_images(storage, shard: str, counters: dict[str, int]) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(row, image bytes) for every `ok` row of one shard, streaming its tar."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{shard}.parquet")))
    rows = {r["key"]: r for r in table.to_pylist() if r["status"] == STATUS_OK}
    seen = set()
    with storage.fs.open(storage.path(f"{shard}.tar"), "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            stem, _, ext = member.name.rpartition(".")
            if ext.lower() in IMAGE_EXTS and stem in rows and stem not in seen:
                seen.add(stem)
                yield rows[stem], tar.extractfile(member).read()
    missing = len(rows) - len(seen)
    if missing:
        log.warning("%s: %d ok rows have no image in %s.tar", shard, missing, shard)
        counters["missing_images"] += missing


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_score(
    output: str,
    clip_model: str,
    reference: str | None,
    out: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    *,
    fid_weights: str | None = None,
    fid_size: int = DEFAULT_FID_SIZE,
    note: str | None = None,
    storage_options: dict[str, Any] | None = None,
    workers: int = 4,
) -> dict[str, Any]:
    """Score an sdfleet output; write NAME.parquet, NAME_summary.json, NAME_fid_vs_clip.png into it.

    Args:
        output: the sdfleet output folder (local or s3://) holding `_job.json`, tars and Parquet.
        clip_model: a transformers CLIP checkpoint (CLIPModel + CLIPProcessor files, safetensors
            weights): a local folder, an s3:// folder (copied once per node) or a hub id (only if the
            hub or its cache is reachable). torchmetrics' CLIPScore default is openai/clip-vit-large-patch14.
        reference: folder (local or s3://) of reference images for FID, e.g. COCO val2017; every
            *.png|jpg|jpeg|webp directly in it. None skips FID.
        out: base name of the files written into `output` (default "scores").
        batch_size: images per CLIP / Inception forward.
        device: "cuda" or "cpu" (default: cuda when available).
        fid_weights: the FID InceptionV3 weights as .safetensors (local or s3://); None skips FID.
        fid_size: side every image is centre-cropped and resized to before the feature extractor.
        note: free text added to the summary's notes and to the plot.
        storage_options: fsspec options for output, reference and s3:// models (default: environment).
        workers: threads that read and decode images.

    Returns the summary dict (also written as NAME_summary.json).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from actors.safety import weights_sha256
    from actors.storage import Storage
    from jobs.finalize import JOB_FILE

    started = time.time()
    name = out or DEFAULT_OUT
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ScoreError(f"--out {out!r}: give a plain file name stem such as 'scores'")
    if batch_size < 1:
        raise ScoreError(f"--batch-size {batch_size}: must be >= 1")
    if bool(reference) != bool(fid_weights):
        raise ScoreError("FID needs both --reference (the real images) and --fid-weights (the InceptionV3 "
                         "weights as .safetensors); give both, or neither to compute CLIP scores only")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    storage = Storage(output, storage_options)
    if not storage.exists(JOB_FILE):
        raise FileNotFoundError(f"{storage.url()} has no {JOB_FILE}: not an sdfleet output")
    job = storage.read_json(JOB_FILE)
    axes = list(job["spec"]["sweep"]["axes"])
    group_cols = ["guidance_scale"] + [a for a in axes if a != "guidance_scale"]
    shards, complete = _shards_to_score(storage, job)
    if not complete:
        log.warning("%s is not complete: scoring the %d committed shards only", storage.url(), len(shards))
    notes: list[str] = []
    model_notes: list[str] = []

    # -- models
    clip, processor, clip_info = _load_clip(clip_model, device, storage_options)
    if clip_info["params"] < MIN_REAL_CLIP_PARAMS:
        model_notes.append(f"CLIP model is tiny ({clip_info['params']:,} parameters)")
    elif clip_info["untrained"]:
        model_notes.append("CLIP model looks untrained (norm layers at their initial values)")
    extractor = None
    fid_info: dict[str, Any] = {"weights": fid_weights, "size": fid_size}
    do_fid = bool(reference)
    if not do_fid:
        notes.append("FID not computed: no --reference and --fid-weights given")
    else:
        extractor = load_feature_extractor(fid_weights, device, storage_options)
        fid_info.update(arch=extractor.arch, num_features=extractor.num_features,
                        sha256=weights_sha256(_local_file(fid_weights, storage_options)))
        if extractor.arch != ARCH_INCEPTION:
            model_notes.append(f"FID feature extractor is the test network {extractor.arch!r}, not InceptionV3")
        elif _untrained_norms(extractor, (torch.nn.BatchNorm2d,)):
            model_notes.append("FID InceptionV3 weights look untrained (batch-norm statistics at initial values)")
    if model_notes:
        notes.insert(0, f"{LOUD_NOTE}: " + "; ".join(model_notes))
    if note:
        notes.append(note)

    pool = ThreadPoolExecutor(max(1, workers))
    fid_size_or_none = fid_size if do_fid else None

    # -- reference statistics, computed once and copied into every sweep point's metric
    ref_metric = None
    ref_count = 0
    if do_fid:
        from torchmetrics.image.fid import FrechetInceptionDistance

        ref_storage = Storage(reference, storage_options)
        ref_names = list_reference_images(ref_storage)
        if len(ref_names) < 2:
            raise FileNotFoundError(f"--reference {ref_storage.url()}: found {len(ref_names)} images "
                                    f"(*.{'|'.join(IMAGE_EXTS)}); FID needs at least 2")
        ref_metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(device)
        load = lambda n: fid_image(ref_storage.read_bytes(n), fid_size)  # noqa: E731
        for i in range(0, len(ref_names), batch_size):
            arrays = list(pool.map(load, ref_names[i:i + batch_size]))
            with torch.no_grad():
                ref_metric.update(torch.from_numpy(np.stack(arrays)).to(device), real=True)
        ref_count = len(ref_names)
        log.info("reference: %d images from %s", ref_count, ref_storage.url())

    metrics: dict[tuple, Any] = {}
    pending: dict[tuple, list] = defaultdict(list)

    def fid_metric(key: tuple):
        if key not in metrics:
            from torchmetrics.image.fid import FrechetInceptionDistance

            m = FrechetInceptionDistance(feature=extractor, reset_real_features=False).to(device)
            for state in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
                setattr(m, state, getattr(ref_metric, state).clone())
            metrics[key] = m
        return metrics[key]

    def flush(key: tuple) -> None:
        if pending[key]:
            with torch.no_grad():
                fid_metric(key).update(torch.from_numpy(np.stack(pending[key])).to(device), real=False)
            pending[key] = []

    # -- generated images
    counters = {"missing_images": 0}
    results: list[dict[str, Any]] = []

    def score_batch(batch: list[tuple[dict[str, Any], bytes]]) -> None:
        decoded = list(pool.map(lambda item: _decode(item[1], processor.image_processor, fid_size_or_none), batch))
        scores = _clip_scores(clip, processor, [px for px, _ in decoded], [r["prompt"] or "" for r, _ in batch],
                              device)
        for (row, _), (_, arr), score in zip(batch, decoded, scores):
            key = tuple(row.get(c) for c in group_cols)
            rec = {"key": row["key"], "shard_id": row["shard_id"], "sample_id": row["sample_id"],
                   "prompt_id": row["prompt_id"], "seed": row["seed"]}
            rec.update({c: row.get(c) for c in group_cols})
            rec["clip_score"] = float(score)
            rec["safety_flagged"] = row.get("safety_flagged")
            results.append(rec)
            if do_fid:
                pending[key].append(arr)
                if len(pending[key]) >= batch_size:
                    flush(key)

    batch: list = []
    for shard in shards:
        for item in _iter_ok_images(storage, shard, counters):
            batch.append(item)
            if len(batch) >= batch_size:
                score_batch(batch)
                batch = []
        log.info("scored shard %s (%d images so far)", shard, len(results) + len(batch))
    if batch:
        score_batch(batch)
    for key in list(pending):
        flush(key)
    pool.shutdown()
    if counters["missing_images"]:
        notes.append(f"{counters['missing_images']} ok rows had no image in their tar")
    if not complete:
        notes.append(f"dataset incomplete: scored the {len(shards)} committed shards of {job['num_shards']}")
    flagged = sum(1 for r in results if r.get("safety_flagged"))
    if flagged:
        notes.append(f"{flagged} scored images were flagged by the safety detector (with action blackout they "
                     "are black images, which FID counts)")

    # -- per sweep point
    by_point: dict[tuple, list[float]] = defaultdict(list)
    for rec in results:
        by_point[tuple(rec[c] for c in group_cols)].append(rec["clip_score"])
    points = []
    for key in sorted(by_point, key=lambda k: tuple((v is None, type(v).__name__, 0 if v is None else v) for v in k)):
        vals = np.asarray(by_point[key], dtype=np.float64)
        point = dict(zip(group_cols, key))
        point.update(n=int(vals.size), clip_score_mean=float(vals.mean()), clip_score_std=float(vals.std()), fid=None)
        if do_fid:
            if vals.size < 2:
                point["fid_error"] = "fewer than 2 images"
            else:
                m = metrics[key].to("cpu")  # float64 eigenvalues on the CPU, the same on every device
                point["fid"] = float(m.compute())
        points.append(point)

    summary = {
        "output": storage.url(),
        "job_name": job["spec"].get("name"),
        "job_fingerprint": job.get("fingerprint"),
        "dataset_complete": complete,
        "shards_scored": len(shards),
        "images_scored": len(results),
        "missing_images": counters["missing_images"],
        "safety_flagged_images": flagged,
        "group_by": group_cols,
        "sweep_axes": job["spec"]["sweep"]["axes"],
        "clip_model": clip_info,
        "fid": {**fid_info, "computed": do_fid, "reference": reference, "reference_images": ref_count,
                "implementation": "torchmetrics.image.fid.FrechetInceptionDistance"},
        "clip_score_definition": "max(100 * cos(image_embeds, text_embeds), 0), as torchmetrics CLIPScore",
        "device": device,
        "figures_meaningful": not model_notes,
        "note": notes[0] if notes else None,
        "notes": notes,
        "points": points,
        "files": {"scores": f"{name}.parquet", "summary": f"{name}_summary.json", "plot": None},
        "seconds": None,
    }

    # -- write
    table = pa.Table.from_pylist(results, schema=_scores_schema(group_cols))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(f"{name}.parquet", buf.getvalue())
    if do_fid and any(p["fid"] is not None for p in points):
        storage.write_bytes(f"{name}_fid_vs_clip.png", _plot(points, group_cols, summary))
        summary["files"]["plot"] = f"{name}_fid_vs_clip.png"
    summary["seconds"] = round(time.time() - started, 2)
    storage.write_json(f"{name}_summary.json", summary)
    log.info("wrote %s, %s%s", storage.url(f"{name}.parquet"), storage.url(f"{name}_summary.json"),
             f", {storage.url(summary['files']['plot'])}" if summary["files"]["plot"] else "")
    return summary


def _scores_schema(group_cols: list[str]):
    import pyarrow as pa

    from schemas.rows import OUTPUT_FIELDS

    types = {f.name: f.type for f in OUTPUT_FIELDS}
    fields = [pa.field("key", pa.string()), pa.field("shard_id", pa.int64()), pa.field("sample_id", pa.string()),
              pa.field("prompt_id", pa.string()), pa.field("seed", pa.int64())]
    fields += [pa.field(c, types.get(c, pa.string())) for c in group_cols]
    fields += [pa.field("clip_score", pa.float64()), pa.field("safety_flagged", pa.bool_())]
    return pa.schema(fields)


# ------------------------------------------------------------------------------------ CLIP


def _load_clip(source: str, device: str, storage_options: dict[str, Any] | None):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from actors.safety import weights_sha256
    from actors.storage import cached_copy, is_remote

    local = str(cached_copy(source, storage_options)) if is_remote(source) else source
    model = CLIPModel.from_pretrained(local, use_safetensors=True).eval().to(device)
    processor = CLIPProcessor.from_pretrained(local)
    params = sum(p.numel() for p in model.parameters())
    info = {"source": source, "params": params,
            "untrained": _untrained_norms(model, (torch.nn.LayerNorm,)),
            "sha256": weights_sha256(local) if Path(local).exists() else None}
    return model, processor, info


def _clip_scores(model, processor, pixel_values: list, texts: list[str], device: str) -> list[float]:
    """torchmetrics' CLIPScore per (image, text) pair: 100 * cosine similarity of the embeddings, clipped at 0.

    Prompts longer than the text encoder's context are truncated by the tokenizer, which keeps the end
    token (as diffusers does when it encodes them); torchmetrics slices the ids instead. The two agree
    on every prompt that fits, e.g. all COCO captions.
    """
    import torch

    max_len = model.config.text_config.max_position_embeddings
    inputs = dict(processor.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_len))
    inputs["pixel_values"] = torch.stack(pixel_values)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        score = (100 * (img * txt).sum(dim=-1)).clamp(min=0)
    return score.float().cpu().tolist()


# ------------------------------------------------------------------------------------ plot


def _plot(points: list[dict[str, Any]], group_cols: list[str], summary: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7, 5.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    others = group_cols[1:]
    series: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        if p["fid"] is not None and math.isfinite(p["fid"]):
            series[tuple(p[c] for c in others)].append(p)
    for key, pts in series.items():
        pts.sort(key=lambda p: p["guidance_scale"])
        label = ", ".join(f"{c}={_fmt(v)}" for c, v in zip(others, key)) or summary.get("job_name") or "images"
        xs, ys = [p["clip_score_mean"] for p in pts], [p["fid"] for p in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for p in pts:
            ax.annotate(_fmt(p["guidance_scale"]), (p["clip_score_mean"], p["fid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"CLIP score ({Path(str(summary['clip_model']['source'])).name})")
    ax.set_ylabel(f"FID ({summary['fid']['reference_images']} reference images)")
    ax.set_title(f"{summary.get('job_name')}: FID vs CLIP score, labels = guidance scale", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or others:
        ax.legend(fontsize=8)
    note = "\n".join(summary["notes"])
    if note:
        import textwrap

        loud = not summary["figures_meaningful"]
        shown = "\n".join(textwrap.fill(n, 70) for n in summary["notes"])
        fig.text(0.5, 0.5 if loud else 0.02, shown, ha="center", va="center" if loud else "bottom",
                 fontsize=11 if loud else 8, color="red" if loud else "black",
                 bbox=dict(facecolor="white", alpha=0.85, edgecolor="red" if loud else "gray"))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Description": note or "", "Software": "sdfleet score"})
    return buf.getvalue()


# ------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `sdfleet score` arguments (wire with `add_arguments(sub.add_parser("score", ...))`)."""
    p.add_argument("output", help="sdfleet output folder or s3:// prefix to score (scores are written into it)")
    p.add_argument("--clip-model", required=True, metavar="SRC",
                   help="CLIP checkpoint (transformers CLIPModel + CLIPProcessor, safetensors): local folder, "
                        "s3:// folder or hub id, e.g. a mirror of openai/clip-vit-large-patch14")
    p.add_argument("--reference", metavar="DIR",
                   help="folder (local or s3://) of reference images for FID, e.g. COCO val2017")
    p.add_argument("--fid-weights", metavar="FILE",
                   help="FID InceptionV3 weights as .safetensors (local or s3://), converted once from "
                        "pt_inception-2015-12-05-6726825d.pth (see the module docstring)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="NAME",
                   help="base name of the files written: NAME.parquet, NAME_summary.json, NAME_fid_vs_clip.png "
                        "(default: scores)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward (default 32)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--fid-size", type=int, default=DEFAULT_FID_SIZE, metavar="PX",
                   help="images are centre-cropped and resized to PX before the feature extractor (default 299)")
    p.add_argument("--note", help="text added to the summary and the plot")


def score_from_args(args: argparse.Namespace) -> int:
    summary = run_score(args.output, args.clip_model, args.reference, out=args.out, batch_size=args.batch_size,
                        device=args.device, fid_weights=args.fid_weights, fid_size=args.fid_size, note=args.note)
    print(f"scored        {summary['images_scored']} images in {summary['shards_scored']} shards"
          f"{'' if summary['dataset_complete'] else ' (dataset incomplete)'}")
    for p in summary["points"]:
        where = ", ".join(f"{c}={_fmt(p[c])}" for c in summary["group_by"])
        fid = "n/a" if p["fid"] is None else f"{p['fid']:.4g}"
        print(f"  {where}: n={p['n']} clip={p['clip_score_mean']:.2f} fid={fid}")
    for n in summary["notes"]:
        print(f"note          {n}")
    print(f"written       {', '.join(f for f in summary['files'].values() if f)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdfleet score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return score_from_args(args)
    except (SpecError, PermissionError, FileNotFoundError) as e:  # as `sdfleet` itself reports them
        print(f"sdfleet score: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
