"""PyTorch models trained by clinfer.train: image CNN, tabular MLP and fusion."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CxrCnn(nn.Module):
    """Small CNN for one-channel chest radiographs.

    The input is float32 (N, 1, 224, 224) in [0, 1] with 1 as bright, as
    ``clinfer.workers.preprocess`` produces it; the model standardises it itself. A
    2x2 average pool first halves the resolution to keep CPU training short. Six
    3x3 convolution blocks follow, each but the last with a 2x2 max pool (112 to 4
    pixels), and a global max pool keeps the strongest local response so that small
    lesions are not averaged away. ``forward`` returns softmax probabilities (N, 2)
    of (negative, positive).
    """

    def __init__(
        self,
        widths: Sequence[int] = (8, 16, 32, 32, 32, 32),
        input_mean: float = 0.5,
        input_std: float = 0.25,
    ):
        super().__init__()
        self.widths = tuple(widths)
        self.input_mean = input_mean
        self.input_std = input_std
        layers: list[nn.Module] = [nn.AvgPool2d(2)]
        in_channels = 1
        for index, width in enumerate(widths):
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.encoder = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.embedding_size = in_channels
        self.classifier = nn.Linear(in_channels, 2)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Return the pooled image embedding, shape (N, ``embedding_size``)."""
        x = (image - self.input_mean) / self.input_std
        return torch.flatten(self.pool(self.encoder(x)), 1)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Return the class logits, shape (N, 2)."""
        return self.classifier(self.features(image))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)


class Standardise(nn.Module):
    """Subtract the training mean and divide by the training standard deviation.

    The statistics are buffers, so they are saved with the weights and exported to
    ONNX with the model, and callers pass raw feature values.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError(
                f"mean and std must be 1-D of one shape, got {tuple(mean.shape)} "
                f"and {tuple(std.shape)}"
            )
        self.register_buffer("mean", mean.to(torch.float32).clone())
        # A constant training feature gets std 1, so it maps to 0 instead of inf.
        safe_std = torch.where(std > 0, std, torch.ones_like(std))
        self.register_buffer("std", safe_std.to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TabularMlp(nn.Module):
    """MLP on standardised tabular features; ``forward`` returns softmax (N, 2).

    Used for the EMR model (inputs ``clinfer.train.emr.EMR_FEATURES``) and, with
    ``hidden=()``, as logistic regression for the breast-cancer Wisconsin model (the
    30 scikit-learn features).
    """

    def __init__(
        self, mean: torch.Tensor, std: torch.Tensor, hidden: Sequence[int] = (32, 32)
    ):
        super().__init__()
        self.standardise = Standardise(mean, std)
        layers: list[nn.Module] = []
        in_features = int(mean.shape[0])
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers.append(nn.Linear(in_features, 2))
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class logits, shape (N, 2)."""
        return self.net(self.standardise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)


class FusionHead(nn.Module):
    """MLP on the concatenation of a standardised image embedding and EMR features."""

    def __init__(
        self,
        embedding_mean: torch.Tensor,
        embedding_std: torch.Tensor,
        emr_mean: torch.Tensor,
        emr_std: torch.Tensor,
        hidden: Sequence[int] = (32, 32),
    ):
        super().__init__()
        self.standardise_embedding = Standardise(embedding_mean, embedding_std)
        self.standardise_emr = Standardise(emr_mean, emr_std)
        layers: list[nn.Module] = []
        in_features = int(embedding_mean.shape[0] + emr_mean.shape[0])
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers.append(nn.Linear(in_features, 2))
        self.net = nn.Sequential(*layers)

    def logits(self, embedding: torch.Tensor, emr: torch.Tensor) -> torch.Tensor:
        """Return the class logits, shape (N, 2)."""
        joint = torch.cat(
            [self.standardise_embedding(embedding), self.standardise_emr(emr)], dim=1
        )
        return self.net(joint)


class FusionModel(nn.Module):
    """Late-fusion model: a ``CxrCnn`` image encoder plus EMR features.

    Inputs are ``image`` (N, 1, 224, 224) in [0, 1] and ``emr`` (N, features) with
    raw values in ``clinfer.train.emr.EMR_FEATURES`` order. ``forward`` returns
    softmax probabilities (N, 2).
    """

    def __init__(self, image_encoder: CxrCnn, head: FusionHead):
        super().__init__()
        self.image_encoder = image_encoder
        self.head = head

    def logits(self, image: torch.Tensor, emr: torch.Tensor) -> torch.Tensor:
        """Return the class logits, shape (N, 2)."""
        return self.head.logits(self.image_encoder.features(image), emr)

    def forward(self, image: torch.Tensor, emr: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image, emr), dim=1)
