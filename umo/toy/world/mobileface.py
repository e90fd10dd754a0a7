"""A small MobileFaceNet: the toy world's second judge, another architecture than the IResNets.

MobileFaceNet (Chen et al. 2018; insightface's `mbf` recognizers, e.g. w600k_mbf.onnx) is MobileNetV2 made for
faces: a strided 3x3 stem and a depthwise 3x3 at 56x56, then inverted-residual blocks (1x1 expand -> depthwise
3x3 -> linear 1x1 projection, a shortcut when the shape allows) down to a 7x7 map, a 1x1 conv, and a global
depthwise conv ("GDC": a 7x7 depthwise conv without padding, so each map position keeps its own weight, unlike
global average pooling) followed by a linear layer to the embedding. Every conv is followed by BatchNorm, and by
PReLU except the linear ones (the projections and the GDC).

Why another architecture: an image tuned against one embedder can exploit that network's blind spots; a judge
built from other operations (depthwise convs, no full 3x3 convs after the stem, no flattened final map into a
wide linear layer) shares fewer of them than another IResNet would.

Input and output as the IResNets of `umo.faces.embed`: (N, 3, 112, 112) RGB in [-1, 1] -> (N, num_features)
unnormalized embeddings, so training (`umo.toy.world.embedders`), the ONNX export and insightface's router treat
it the same way. Not a real-face model: a quarter to a half of the paper's widths, for one CPU thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MobileFaceSpec:
    """A MobileFaceNet's shape.

    stem: channels of the stride-2 3x3 stem and of the depthwise 3x3 after it (56x56 at 112 px input).
    stages: one (channels, blocks, expansion) per stride-2 stage; each starts with a stride-2 inverted residual
    block and adds `blocks` stride-1 ones with shortcuts; expansion: the hidden width as a multiple of the block's
    input. Three stages take 56x56 to 7x7.
    head: channels of the 1x1 conv before the GDC.
    """

    stem: int
    stages: tuple[tuple[int, int, int], ...]
    head: int


ARCHS: dict[str, MobileFaceSpec] = {
    # A quarter to a half of MobileFaceNet's widths (64 / 64, 128, 128) and fewer stride-1 blocks (4, 6, 2 in
    # the paper), but its 512-channel head: trained on 200 people, held-out TAR@FAR1e-3 went from 0.82 (head 128,
    # last stage 32) to 0.88 in the same time (lr 3e-3; 0.96 at lr 0.01). About 1.2 s per step of 128 crops on
    # one CPU thread, twice an IResNet toy_r10's: PReLU's backward on the wide early maps dominates.
    "toy_mbf": MobileFaceSpec(stem=16, stages=((16, 2, 2), (32, 2, 4), (64, 1, 2)), head=512),
}


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> PReLU, or without the PReLU when `linear` (a projection)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, padding: int = 0, groups: int = 1,
                 linear: bool = False) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if not linear:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand to `hidden` -> depthwise 3x3 (stride) -> linear 1x1 projection to `cout`; plus the input when
    stride is 1 and cin == cout. (B, cin, H, W) -> (B, cout, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, cin: int, cout: int, hidden: int, stride: int) -> None:
        super().__init__()
        self.expand = ConvBN(cin, hidden, 1)
        self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, padding=1, groups=hidden)
        self.project = ConvBN(hidden, cout, 1, linear=True)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.shortcut else out


class GlobalDepthwiseHead(nn.Module):
    """GDC: a depthwise conv as large as the map (one weight per channel and position) -> (B, C) -> a linear
    layer to the embedding -> BatchNorm1d. (B, C, S, S) -> (B, num_features)."""

    def __init__(self, channels: int, side: int, num_features: int) -> None:
        super().__init__()
        self.gdc = ConvBN(channels, channels, side, groups=channels, linear=True)
        self.fc = nn.Linear(channels, num_features, bias=False)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(self.gdc(x), 1)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet of a `MobileFaceSpec`: (N, 3, S, S) RGB in [-1, 1] -> (N, num_features) unnormalized.

    image_size: S (112 as arcface's crops); the map reaching the GDC is S / 2 ** (1 + stages) wide (7 at 112
    with three stages).
    """

    def __init__(self, spec: MobileFaceSpec, *, num_features: int = 128, image_size: int = 112) -> None:
        super().__init__()
        scale = 2 ** (1 + len(spec.stages))  # the stem's stride and each stage's
        if image_size % scale:
            raise ValueError(f"image_size must be a multiple of {scale} (the network's stride), got {image_size}")
        self.stem = nn.Sequential(ConvBN(3, spec.stem, 3, stride=2, padding=1),
                                  ConvBN(spec.stem, spec.stem, 3, padding=1, groups=spec.stem))
        blocks: list[nn.Module] = []
        cin = spec.stem
        for cout, n_blocks, expansion in spec.stages:
            blocks.append(InvertedResidual(cin, cout, cin * expansion, stride=2))
            blocks += [InvertedResidual(cout, cout, cout * expansion, stride=1) for _ in range(n_blocks)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head_conv = ConvBN(cin, spec.head, 1)
        self.head = GlobalDepthwiseHead(spec.head, image_size // scale, num_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_conv(self.blocks(self.stem(x))))


def mobilefacenet(arch: str, *, num_features: int = 128) -> MobileFaceNet:
    """Build a MobileFaceNet by name (random init, train mode): "toy_mbf" (see ARCHS)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown MobileFaceNet arch {arch!r}; choose one of {sorted(ARCHS)}")
    return MobileFaceNet(ARCHS[arch], num_features=num_features)
