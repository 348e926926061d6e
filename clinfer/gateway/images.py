"""PNG renderings of a preprocessed frame and of its saliency overlay."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5


def _to_png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _gray(frame: np.ndarray) -> np.ndarray:
    # Frames are model inputs with values in [0, 1] and shape (1, H, W) or (H, W).
    plane = np.squeeze(np.asarray(frame, dtype=np.float32))
    return np.clip(plane, 0.0, 1.0)


def frame_png(frame: np.ndarray) -> bytes:
    """Render a preprocessed frame (values in [0, 1]) as a grey-scale RGB PNG."""
    gray = (_gray(frame) * 255.0).astype(np.uint8)
    return _to_png(np.stack([gray] * 3, axis=-1))


def overlay_png(frame: np.ndarray, saliency: np.ndarray) -> bytes:
    """Render the frame with the saliency map, scaled to [0, 1], blended in red.

    The map is resized to the frame with bilinear interpolation when their sizes
    differ.
    """
    gray = _gray(frame)
    heat = np.squeeze(np.asarray(saliency, dtype=np.float32))
    if heat.shape != gray.shape:
        resized = Image.fromarray(heat).resize(
            (gray.shape[1], gray.shape[0]), Image.Resampling.BILINEAR
        )
        heat = np.asarray(resized, dtype=np.float32)
    span = float(heat.max() - heat.min())
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    weight = OVERLAY_ALPHA * heat
    red = gray * (1.0 - weight) + weight
    green = gray * (1.0 - weight)
    blue = gray * (1.0 - weight)
    rgb = np.stack([red, green, blue], axis=-1)
    return _to_png((np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8))
