"""The FID feature extractors: the FID InceptionV3 (and a tiny stand-in for tests) and their loader.

torchmetrics' own InceptionV3 would download its weights, so `InceptionV3FID` rebuilds the
TensorFlow 2015-12-05 graph (as ported by pytorch-fid) without torchvision, with the parameter
names of the published `pt_inception-2015-12-05-6726825d.pth`. Weights come only from safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdfleet.actors.model_cache import local_copy
from sdfleet.jobs.score import ScoreError
from sdfleet.schemas.weights import is_safetensors

# safetensors metadata key naming the feature extractor's architecture; absent -> the FID InceptionV3.
ARCH_METADATA_KEY = "sdfleet_feature_extractor"


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TensorFlow's) -> ReLU; parameter names `conv`, `bn`."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    # TensorFlow's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def max_pool_same(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


def max_pool_down(x):
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


# The five block kinds, named as torchvision names them.


class InceptionA(Mixed):
    def __init__(self, cin, pool_features):
        super().__init__(
            {
                "branch1x1": (cin, 64, 1),
                "branch5x5_1": (cin, 48, 1),
                "branch5x5_2": (48, 64, 5, 1, 2),
                "branch3x3dbl_1": (cin, 64, 1),
                "branch3x3dbl_2": (64, 96, 3, 1, 1),
                "branch3x3dbl_3": (96, 96, 3, 1, 1),
                "branch_pool": (cin, pool_features, 1),
            },
            [
                (None, ["branch1x1"], None),
                (None, ["branch5x5_1", "branch5x5_2"], None),
                (None, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], None),
                (avg_pool, ["branch_pool"], None),
            ],
        )


class InceptionB(Mixed):
    def __init__(self, cin):
        super().__init__(
            {
                "branch3x3": (cin, 384, 3, 2),
                "branch3x3dbl_1": (cin, 64, 1),
                "branch3x3dbl_2": (64, 96, 3, 1, 1),
                "branch3x3dbl_3": (96, 96, 3, 2),
            },
            [
                (None, ["branch3x3"], None),
                (None, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], None),
                (max_pool_down, [], None),
            ],
        )


class InceptionC(Mixed):
    def __init__(self, cin, c7):
        row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
        super().__init__(
            {
                "branch1x1": (cin, 192, 1),
                "branch7x7_1": (cin, c7, 1),
                "branch7x7_2": (c7, c7, *row),
                "branch7x7_3": (c7, 192, *col),
                "branch7x7dbl_1": (cin, c7, 1),
                "branch7x7dbl_2": (c7, c7, *col),
                "branch7x7dbl_3": (c7, c7, *row),
                "branch7x7dbl_4": (c7, c7, *col),
                "branch7x7dbl_5": (c7, 192, *row),
                "branch_pool": (cin, 192, 1),
            },
            [
                (None, ["branch1x1"], None),
                (None, ["branch7x7_1", "branch7x7_2", "branch7x7_3"], None),
                (None, [f"branch7x7dbl_{i}" for i in range(1, 6)], None),
                (avg_pool, ["branch_pool"], None),
            ],
        )


class InceptionD(Mixed):
    def __init__(self, cin):
        super().__init__(
            {
                "branch3x3_1": (cin, 192, 1),
                "branch3x3_2": (192, 320, 3, 2),
                "branch7x7x3_1": (cin, 192, 1),
                "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
                "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)),
                "branch7x7x3_4": (192, 192, 3, 2),
            },
            [
                (None, ["branch3x3_1", "branch3x3_2"], None),
                (None, ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"], None),
                (max_pool_down, [], None),
            ],
        )


class InceptionE(Mixed):
    def __init__(self, cin, pool):
        # The FID graph's last block pools with max where the paper (and torchvision) use average.
        super().__init__(
            {
                "branch1x1": (cin, 320, 1),
                "branch3x3_1": (cin, 384, 1),
                "branch3x3_2a": (384, 384, (1, 3), 1, (0, 1)),
                "branch3x3_2b": (384, 384, (3, 1), 1, (1, 0)),
                "branch3x3dbl_1": (cin, 448, 1),
                "branch3x3dbl_2": (448, 384, 3, 1, 1),
                "branch3x3dbl_3a": (384, 384, (1, 3), 1, (0, 1)),
                "branch3x3dbl_3b": (384, 384, (3, 1), 1, (1, 0)),
                "branch_pool": (cin, 192, 1),
            },
            [
                (None, ["branch1x1"], None),
                (None, ["branch3x3_1"], ["branch3x3_2a", "branch3x3_2b"]),
                (
                    None,
                    ["branch3x3dbl_1", "branch3x3dbl_2"],
                    ["branch3x3dbl_3a", "branch3x3dbl_3b"],
                ),
                (pool, ["branch_pool"], None),
            ],
        )


class FeatureExtractor(nn.Module):
    """torchmetrics' contract for a custom FID feature: uint8 (N, 3, H, W) in, (N, num_features) out."""

    arch: str  # the name in a weights file's metadata
    input_size: int
    num_features: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {x.dtype}")
        x = x.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return self.features((x - 128) / 128)

    def train(self, mode: bool = True):  # batch norm stays in inference mode, always
        return super().train(False)


class InceptionV3FID(FeatureExtractor):
    """The FID InceptionV3 (TF 2015-12-05 graph), 2048-d pool features. Parameter names match
    pytorch-fid's pt_inception-2015-12-05 weights; `fc` (1008 classes) is loaded but unused."""

    arch = "inception-v3-fid"
    input_size = 299
    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, 2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, 1, 1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg_pool)
        self.Mixed_7c = InceptionE(2048, max_pool_same)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_down(x)
        x = max_pool_down(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class TinyFeatureExtractor(FeatureExtractor):
    """For tests only: two strided convs on 32x32 input, 16 features. Same interface as InceptionV3FID."""

    arch = "tiny-conv"
    input_size = 32
    num_features = 16

    def __init__(self):
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, 3, 2, 1)
        self.conv2 = BasicConv2d(8, 16, 3, 2, 1)

    def features(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.conv2(self.conv1(x)), 1), 1)


ARCHITECTURES: dict[str, type[FeatureExtractor]] = {
    cls.arch: cls for cls in (InceptionV3FID, TinyFeatureExtractor)
}


def load_feature_extractor(
    weights: str, device: str = "cpu", storage_options: dict[str, Any] | None = None
) -> FeatureExtractor:
    """The FID feature extractor with its weights from a safetensors file (local path or s3://).

    The architecture is InceptionV3FID unless the file's safetensors metadata names another
    (``sdfleet_feature_extractor: tiny-conv``, written by ``jobs.tiny.write_tiny_inception``).
    Every parameter and buffer of the network must be in the file (``num_batches_tracked`` aside),
    and nothing else may be.
    """
    path = Path(local_copy(weights, storage_options))
    if not is_safetensors(path.name):
        raise ScoreError(
            f"--fid-weights {weights}: expected a .safetensors file (sdfleet never unpickles weights); "
            "see `sdfleet score --help` for converting the official .pth once"
        )
    if not path.is_file():
        raise ScoreError(f"--fid-weights {weights}: no such file")
    with safe_open(str(path), framework="pt") as f:
        arch = (f.metadata() or {}).get(ARCH_METADATA_KEY, InceptionV3FID.arch)
    if arch not in ARCHITECTURES:
        raise ScoreError(
            f"--fid-weights {weights}: unknown feature extractor architecture {arch!r}; "
            f"known: {', '.join(ARCHITECTURES)}"
        )
    net = ARCHITECTURES[arch]()
    missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ScoreError(
            f"--fid-weights {weights} does not fit the {arch} network: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    net.requires_grad_(False)
    return net.eval().to(device)
