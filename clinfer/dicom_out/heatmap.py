"""Class activation maps of ``CxrCnn``, aligned to the preprocessed model input."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from clinfer.train.models import CxrCnn

logger = logging.getLogger(__name__)


def class_activation_map(model: CxrCnn, frame: np.ndarray) -> np.ndarray:
    """Return the positive-class activation map of one input frame.

    ``CxrCnn`` ends in a global max pool and a linear layer, so the class
    activation map (Zhou et al., CVPR 2016) is the last convolution block's output
    weighted by the positive-minus-negative logit weights of each channel. The
    coarse map is resized bilinearly to the input size. Values are in logit units;
    the pooled map's maximum plus the bias difference is the positive-minus-negative
    logit.

    Parameters
    ----------
    model
        A trained ``CxrCnn`` (eval mode is set here) or the image encoder of a
        ``FusionModel``, whose own classifier is then used.
    frame
        float32 array of shape (1, H, W) or (H, W) in [0, 1].

    Returns
    -------
    numpy.ndarray
        float32 array of shape (H, W).

    Raises
    ------
    ValueError
        If ``frame`` is not 2-D or (1, H, W).
    """
    array = np.asarray(frame, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(
            f"frame must have shape (1, H, W) or (H, W), got {frame.shape}"
        )
    model.eval()
    image = torch.from_numpy(array)[None, None]
    with torch.no_grad():
        activations = model.encoder((image - model.input_mean) / model.input_std)
        weights = model.classifier.weight[1] - model.classifier.weight[0]
        cam = torch.einsum("c,nchw->nhw", weights, activations)[:, None]
        resized = F.interpolate(
            cam, size=array.shape, mode="bilinear", align_corners=False
        )
    return resized[0, 0].numpy().astype(np.float32)
