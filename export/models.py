"""PyTorch architectures that clinfer exports to Triton."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with an identity or projection skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ChestXrayResNet(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks) with reduced widths for one-channel images.

    The input is a batch of preprocessed images, float32 (N, 1, H, W) in [0, 1] with 1 as
    bright. The model standardises it itself, so callers only implement the DICOM-side
    preprocessing. The output is class probabilities (N, num_classes), softmax.
    """

    def __init__(
        self,
        num_classes: int = 2,
        widths: tuple[int, int, int, int] = (16, 32, 64, 128),
        input_mean: float = 0.5,
        input_std: float = 0.25,
    ):
        super().__init__()
        self.input_mean = input_mean
        self.input_std = input_std
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(BasicBlock(in_channels, width, stride))
            stages.append(BasicBlock(width, width, 1))
            in_channels = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.input_mean) / self.input_std
        x = self.features(self.stem(x))
        logits = self.classifier(torch.flatten(self.pool(x), 1))
        return torch.softmax(logits, dim=1)


def build_untrained_cxr_model(seed: int = 0) -> ChestXrayResNet:
    """Build the chest-radiograph classifier with seeded random (untrained) weights.

    BatchNorm running statistics stay at their initial values (mean 0, variance 1), so
    the model in eval mode is a fixed random function of its input: its scores carry no
    clinical meaning.
    """
    torch.manual_seed(seed)
    model = ChestXrayResNet()
    model.eval()
    return model
