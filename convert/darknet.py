"""DarkNet19, the classification backbone of YOLO9000 (Redmon & Farhadi, 2017).

19 convolutions (3x3 with 1x1 bottlenecks), 5 max-pools, batch norm and
LeakyReLU(0.1); the last 1x1 convolution has 1000 filters, linear, and global
average pooling turns it into the 1000-d feature vector the paper feeds to
mRMR + SVM. A training-only linear layer maps those features to the classes.
"""

from __future__ import annotations

import torch
from torch import nn

# (filters, kernel) per conv; "M" = 2x2 max-pool. As in darknet19.cfg.
DARKNET19 = [
    (32, 3), "M",
    (64, 3), "M",
    (128, 3), (64, 1), (128, 3), "M",
    (256, 3), (128, 1), (256, 3), "M",
    (512, 3), (256, 1), (512, 3), (256, 1), (512, 3), "M",
    (1024, 3), (512, 1), (1024, 3), (512, 1), (1024, 3),
]
FEATURES = 1000


class DarkNet19(nn.Module):
    """DarkNet19 taking RGB pixel values 0..255 (NCHW float).

    Normalisation lives inside the network (``mean``/``std`` buffers), so the
    exported graph's input is raw pixels and its int8 quantization is an exact
    shift (scale 1, zero point -128): no rounding between the Pi's camera and
    the first convolution.
    """

    def __init__(self, num_classes: int, width: float = 1.0, features: int = FEATURES):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in DARKNET19:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            filters, k = item
            c_out = max(8, int(filters * width))
            layers += [
                nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.1, inplace=True),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, features, 1))  # conv 19: 1000 filters, linear
        self.backbone = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, num_classes)  # training only
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 127.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 64.0))
        self.width = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu")

    def set_normalisation(self, mean, std) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FeatureNet(nn.Module):
    """What is exported: pixels in, 1000-d pooled features out."""

    def __init__(self, net: DarkNet19):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)
