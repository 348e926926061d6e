"""Class activation maps of ``CxrCnn`` as an exportable output, and PNG overlays."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from clinfer.errors import ExportError
from clinfer.train.models import CxrCnn

logger = logging.getLogger(__name__)

# Index in ``CxrCnn.encoder`` of the ReLU whose output the attribution is taken at:
# the third block, 28x28 cells for a 224x224 input, 8 input pixels apart.
DEFAULT_ATTRIBUTION_LAYER = 11
SALIENCY_METHODS = ("gradient_x_activation", "cam")
SALIENCY_EPSILON = 1e-6


@dataclass(frozen=True)
class GridGeometry:
    """Input-pixel centre of feature-map cell ``j``: ``offset + step * j``; ``size`` cells."""

    offset: float
    step: float
    size: int


def layer_geometry(layers: nn.Sequential, input_size: int) -> GridGeometry:
    """Return where the cells of the output of ``layers`` sit in the input.

    Pixel ``p`` of the input has its centre at ``p + 0.5``. Convolutions are 3x3
    with padding 1 and keep the grid. A 2x2 stride-2 pool (floor mode) centres
    output cell ``j`` between its input cells ``2j`` and ``2j + 1``.

    Raises
    ------
    ExportError
        If a layer is a convolution or pool of another shape.
    """
    offset, step, size = 0.5, 1.0, input_size
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            if layer.kernel_size != (3, 3) or layer.padding != (1, 1):
                raise ExportError(f"unsupported layer {layer}; expected 3x3, padding 1")
        elif isinstance(layer, nn.AvgPool2d | nn.MaxPool2d):
            if layer.kernel_size not in (2, (2, 2)) or layer.stride not in (2, (2, 2)):
                raise ExportError(f"unsupported layer {layer}; expected 2x2 stride 2")
            offset += step / 2
            step *= 2
            size //= 2
    return GridGeometry(offset, step, size)


def interpolation_matrix(geometry: GridGeometry, output_size: int) -> np.ndarray:
    """Return the (output_size, geometry.size) linear interpolation weights.

    Row ``i`` interpolates the map at input-pixel centre ``i + 0.5`` from the two
    nearest cell centres. Pixels outside the first or last cell centre take that
    cell's value.
    """
    centres = np.arange(output_size, dtype=np.float64) + 0.5
    position = np.clip(
        (centres - geometry.offset) / geometry.step, 0, geometry.size - 1
    )
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, geometry.size - 1)
    fraction = position - lower
    weights = np.zeros((output_size, geometry.size), dtype=np.float32)
    np.add.at(weights, (np.arange(output_size), lower), 1.0 - fraction)
    np.add.at(weights, (np.arange(output_size), upper), fraction)
    return weights


def _first_max_one_hot(values: torch.Tensor) -> torch.Tensor:
    """Return a one-hot float mask of the first maximum along the last axis."""
    choice = values.argmax(dim=-1, keepdim=True)
    positions = torch.arange(values.shape[-1], device=values.device)
    return (positions == choice).to(values.dtype)


def _max_pool_backward(grad: torch.Tensor, pool_input: torch.Tensor) -> torch.Tensor:
    """Route the gradient of a 2x2 stride-2 max pool to each window's arg-max.

    Like PyTorch's max pool, the first maximum of a window in row-major order gets
    the whole gradient, so ties are broken the same way in PyTorch and ONNX. Floor
    mode drops the last row or column of an odd-sized input, which gets none.
    """
    channels, height, width = pool_input.shape[1:]
    rows, cols = height // 2, width // 2
    windows = (
        pool_input[:, :, : 2 * rows, : 2 * cols]
        .reshape(-1, channels, rows, 2, cols, 2)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(-1, channels, rows, cols, 4)
    )
    spread = _first_max_one_hot(windows) * grad.unsqueeze(-1)
    spread = (
        spread.reshape(-1, channels, rows, cols, 2, 2)
        .permute(0, 1, 2, 4, 3, 5)
        .reshape(-1, channels, 2 * rows, 2 * cols)
    )
    return F.pad(spread, (0, width - 2 * cols, 0, height - 2 * rows))


def _layer_backward(
    layer: nn.Module, grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Return d(logit)/d(x) from d(logit)/d(y) for one encoder layer ``y = layer(x)``."""
    if isinstance(layer, nn.ReLU):
        return grad * (y > 0).to(grad.dtype)
    if isinstance(layer, nn.BatchNorm2d):
        scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
        return grad * scale.reshape(1, -1, 1, 1)
    if isinstance(layer, nn.Conv2d):
        return F.conv_transpose2d(grad, layer.weight, padding=layer.padding)
    if isinstance(layer, nn.MaxPool2d):
        return _max_pool_backward(grad, x)
    raise ExportError(f"no backward rule for {layer}")


class CxrCnnWithSaliency(nn.Module):
    """``CxrCnn`` returning softmax probabilities (N, 2) and a saliency map (N, H, W).

    Both outputs come from one pass through the encoder. The saliency map explains
    the positive-minus-negative logit ``z = sum_k w_k max_xy A_k(x, y) + b`` with
    ``w = W[1] - W[0]`` of the linear head (the softmax positive probability is the
    sigmoid of ``z``) and ``A_k`` the last ReLU maps.

    ``method="cam"`` is the class activation map (CAM, Zhou et al. 2016)
    ``M(x, y) = sum_k w_k A_k(x, y)`` on the last maps. Grad-CAM weights channel
    ``k`` by the spatial mean of ``dz / dA_k(x, y)``. Through a global max pool that
    gradient is ``w_k`` at the arg-max cell of ``A_k`` and 0 elsewhere, so its
    spatial sum is ``w_k``. The Grad-CAM weight is therefore ``w_k / (H W)``, as for
    global average pooling, and Grad-CAM is this CAM divided by ``H W``. Because ``CxrCnn``'s
    last maps are 3x3 for a 224x224 input, each cell spans 64 input pixels.

    ``method="gradient_x_activation"`` (the default) keeps the arg-max structure
    that CAM discards. It computes ``sum_k dz/dA_k(x, y) * A_k(x, y)`` at the
    encoder layer ``attribution_layer`` (28x28 by default). The gradient is written
    out as forward operations, because ONNX has no autograd: the head's ``w_k`` at
    each channel's arg-max, then per layer a max pool's gradient to its arg-max
    cells, the ReLU mask, the batch-norm scale and a transposed convolution. At the
    last layer this map is ``w_k A_k`` at the arg-max cells only, i.e. the part of
    CAM that reaches the logit.

    Either map is clipped at 0 (Grad-CAM's ReLU, so only evidence for the positive
    class shows), linearly interpolated to the input size with fixed weights (a
    constant matrix product in ONNX) from the cell centres given by
    ``layer_geometry``, and divided by its maximum, so it lies in [0, 1] and is all 0
    when nothing supports the positive class. Saliency pixel ``(r, c)`` is pixel
    ``(r, c)`` of the preprocessed input. To map back to the original image, undo
    ``clinfer.workers.preprocess``: divide by ``224 / max(rows, columns)`` and
    subtract the zero padding ``((side - rows) // 2, (side - columns) // 2)``
    (``input_to_original``).
    """

    def __init__(
        self,
        model: CxrCnn,
        *,
        method: str = "gradient_x_activation",
        attribution_layer: int = DEFAULT_ATTRIBUTION_LAYER,
        input_size: int = 224,
    ):
        super().__init__()
        if method not in SALIENCY_METHODS:
            raise ExportError(
                f"unknown saliency method {method!r}; use {SALIENCY_METHODS}"
            )
        self.model = copy.deepcopy(model).eval()
        encoder = self.model.encoder
        if method == "cam":
            attribution_layer = len(encoder) - 1
        if not isinstance(encoder[attribution_layer], nn.ReLU):
            raise ExportError(
                f"encoder layer {attribution_layer} is {encoder[attribution_layer]}; "
                "choose the index of a ReLU"
            )
        self.method = method
        self.attribution_layer = attribution_layer
        self.geometry = layer_geometry(encoder[: attribution_layer + 1], input_size)
        weight = self.model.classifier.weight.detach()
        self.register_buffer(
            "logit_weight", (weight[1] - weight[0]).reshape(1, -1, 1, 1)
        )
        matrix = torch.from_numpy(interpolation_matrix(self.geometry, input_size))
        self.register_buffer("upsample", matrix)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.model.encoder
        x = (image - self.model.input_mean) / self.model.input_std
        for layer in encoder[: self.attribution_layer + 1]:
            x = layer(x)
        attribution_maps = x
        trace = []
        for layer in encoder[self.attribution_layer + 1 :]:
            y = layer(x)
            trace.append((layer, x, y))
            x = y
        pooled = torch.flatten(self.model.pool(x), 1)
        probabilities = torch.softmax(self.model.classifier(pooled), dim=1)

        if self.method == "cam":
            relevance = (attribution_maps * self.logit_weight).sum(dim=1)
        else:
            # The global max pool's gradient: w_k at each channel's first arg-max.
            channels, height, width = x.shape[1:]
            is_max = _first_max_one_hot(x.reshape(-1, channels, height * width))
            grad = self.logit_weight * is_max.reshape(-1, channels, height, width)
            for layer, layer_input, layer_output in reversed(trace):
                grad = _layer_backward(layer, grad, layer_input, layer_output)
            relevance = (grad * attribution_maps).sum(dim=1)
        upsampled = self.upsample @ torch.relu(relevance) @ self.upsample.T
        peak = upsampled.amax(dim=(1, 2), keepdim=True)
        saliency = upsampled / torch.clamp(peak, min=SALIENCY_EPSILON)
        return probabilities, saliency


def original_to_input(
    row: float, col: float, rows: int, columns: int, size: int = 224
) -> tuple[float, float]:
    """Map a stored-pixel coordinate of the original image to the model input.

    Coordinates are continuous with pixel ``p`` spanning ``[p, p + 1)``. The
    preprocessing zero-pads the image to a centred square of side
    ``max(rows, columns)`` and resizes it to ``size`` with Pillow's bilinear filter,
    which maps input edges onto output edges.
    """
    side = max(rows, columns)
    scale = size / side
    return (row + (side - rows) // 2) * scale, (col + (side - columns) // 2) * scale


def input_to_original(
    row: float, col: float, rows: int, columns: int, size: int = 224
) -> tuple[float, float]:
    """Map a model-input coordinate back to the original image (inverse of above)."""
    side = max(rows, columns)
    scale = size / side
    return row / scale - (side - rows) // 2, col / scale - (side - columns) // 2


def box_to_input(
    box: tuple[int, int, int, int], rows: int, columns: int, size: int = 224
) -> tuple[float, float, float, float]:
    """Map a ``(row_min, col_min, row_max, col_max)`` box (maxima exclusive) to the input."""
    top, left = original_to_input(box[0], box[1], rows, columns, size)
    bottom, right = original_to_input(box[2], box[3], rows, columns, size)
    return top, left, bottom, right


def saliency_peak(saliency: np.ndarray) -> tuple[int, int]:
    """Return the (row, col) pixel of the maximum of a 2-D saliency map."""
    row, col = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    return int(row), int(col)


def peak_in_box(saliency: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Return whether the peak pixel's centre lies in a box in input coordinates."""
    row, col = saliency_peak(saliency)
    return box[0] <= row + 0.5 < box[2] and box[1] <= col + 0.5 < box[3]


def write_overlay_png(
    image: np.ndarray, saliency: np.ndarray, path: Path, *, alpha: float = 0.45
) -> Path:
    """Write the grey input image with the saliency map blended over it in red.

    Parameters
    ----------
    image
        Preprocessed input, shape (H, W) or (1, H, W), values in [0, 1].
    saliency
        Saliency map of the same height and width, values in [0, 1].
    path
        PNG file to write.
    alpha
        Opacity of the heatmap where saliency is 1.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If the shapes differ or ``alpha`` is outside [0, 1].
    OSError
        If the file cannot be written.
    """
    grey = np.asarray(image, dtype=np.float32).squeeze()
    heat = np.asarray(saliency, dtype=np.float32).squeeze()
    if grey.shape != heat.shape or grey.ndim != 2:
        raise ValueError(
            f"image {grey.shape} and saliency {heat.shape} must be one 2-D shape"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = np.repeat(np.clip(grey, 0, 1)[..., np.newaxis], 3, axis=2)
    red = np.zeros_like(base)
    red[..., 0] = 1.0
    weight = (alpha * np.clip(heat, 0, 1))[..., np.newaxis]
    blended = (1 - weight) * base + weight * red
    Image.fromarray((blended * 255).round().astype(np.uint8), mode="RGB").save(path)
    return Path(path)
