"""Synthetic chest-radiograph phantoms with nodule and opacity findings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

NODULE = "nodule"
OPACITY = "opacity"

# A finding's mask is where its added brightness exceeds this fraction of its peak.
MASK_FRACTION = 0.25


@dataclass(frozen=True)
class Finding:
    """One synthetic lesion in stored-pixel coordinates.

    ``box`` is ``(row_min, col_min, row_max, col_max)`` with the maxima exclusive, the
    bounding box of the lesion's mask (added brightness of at least ``MASK_FRACTION``
    of its peak). ``contrast`` is the peak added brightness on the phantom's [0, 1]
    scale, where 1 is bright.
    """

    kind: str
    center_row: float
    center_col: float
    radius_px: float
    contrast: float
    box: tuple[int, int, int, int]
    mask_pixels: int


@dataclass(frozen=True)
class Phantom:
    """A synthetic chest radiograph: brightness in [0, 1] (1 is bright) and findings."""

    brightness: np.ndarray
    findings: tuple[Finding, ...]
    mask: np.ndarray


def _smooth_inside(distance: np.ndarray, softness: float) -> np.ndarray:
    """Return ~1 where ``distance`` < 1 and ~0 outside, with a logistic edge."""
    return 1.0 / (1.0 + np.exp((distance - 1.0) / softness))


def _ellipse_distance(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)


def _low_frequency_noise(
    rng: np.random.Generator, shape: tuple[int, int], grid: int
) -> np.ndarray:
    """Return smooth noise with unit-order amplitude by upsampling a coarse grid."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BICUBIC
    )
    return np.asarray(image, dtype=np.float64)


def _lung_fields(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, list[tuple[float, float, float, float]]]:
    """Return the soft lung mask and each lung's ellipse (cy, cx, ry, rx)."""
    lungs = np.zeros_like(yy)
    ellipses = []
    spread = rng.uniform(0.19, 0.23)
    for side in (-1.0, 1.0):
        cy = 0.47 + rng.uniform(-0.03, 0.03)
        cx = 0.5 + side * spread
        ry = rng.uniform(0.27, 0.32)
        rx = rng.uniform(0.13, 0.16)
        inside = _smooth_inside(_ellipse_distance(yy, xx, cy, cx, ry, rx), 0.04)
        # The diaphragm dome cuts off the bottom of each lung.
        dome = cy + 0.72 * ry - 1.2 * (xx - cx) ** 2
        inside *= 1.0 / (1.0 + np.exp((yy - dome) / 0.01))
        lungs = np.maximum(lungs, inside)
        ellipses.append((cy, cx, ry, rx))
    return lungs, ellipses


def _ribs(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Return rib shadows: shallow arcs across the chest, brightness up to 1."""
    ribs = np.zeros_like(yy)
    first = rng.uniform(0.18, 0.22)
    spacing = rng.uniform(0.065, 0.075)
    thickness = rng.uniform(0.010, 0.014)
    for index in range(9):
        y0 = first + index * spacing
        # Ribs leave the spine and fall towards the lateral chest wall.
        arc = y0 + 0.9 * (xx - 0.5) ** 2
        ribs = np.maximum(ribs, np.exp(-(((yy - arc) / thickness) ** 2)))
    thorax = _smooth_inside(_ellipse_distance(yy, xx, 0.45, 0.5, 0.4, 0.4), 0.05)
    return ribs * thorax


def _anatomy(
    rng: np.random.Generator, rows: int, columns: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float, float]]]:
    """Return the lesion-free brightness, the soft lung mask and the lung ellipses."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    yy = (yy + 0.5) / rows
    xx = (xx + 0.5) / columns

    body = _smooth_inside(_ellipse_distance(yy, xx, 0.55, 0.5, 0.62, 0.47), 0.03)
    brightness = 0.06 + rng.uniform(0.38, 0.48) * body

    lungs, ellipses = _lung_fields(rng, yy, xx)
    heart_cy = 0.63 + rng.uniform(-0.02, 0.02)
    heart_cx = 0.54 + rng.uniform(-0.02, 0.02)
    heart = _smooth_inside(
        _ellipse_distance(yy, xx, heart_cy, heart_cx, 0.15, rng.uniform(0.12, 0.15)),
        0.08,
    )
    # The heart shadow hides the medial lung behind it.
    lungs = lungs * (1.0 - 0.8 * heart)
    brightness -= rng.uniform(0.24, 0.30) * lungs
    brightness += 0.07 * heart
    # Vessel markings: finer texture inside the lungs only.
    brightness += 0.02 * _low_frequency_noise(rng, (rows, columns), 24) * lungs

    spine = np.exp(-(((xx - 0.5) / 0.035) ** 4)) * body
    brightness += 0.12 * spine
    brightness += rng.uniform(0.04, 0.07) * _ribs(rng, yy, xx) * body
    brightness += 0.025 * _low_frequency_noise(rng, (rows, columns), 8) * body
    return brightness, lungs, ellipses


def _place_finding(
    rng: np.random.Generator,
    kind: str,
    rows: int,
    columns: int,
    ellipses: list[tuple[float, float, float, float]],
) -> tuple[np.ndarray, float, float, float, float]:
    """Draw one lesion inside a lung; return its added brightness and geometry."""
    cy, cx, ry, rx = ellipses[int(rng.integers(len(ellipses)))]
    # Polar sampling inside the upper 80 % of the ellipse keeps lesions off the dome.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    radial = 0.6 * np.sqrt(rng.uniform(0.0, 1.0))
    center_row = (cy + radial * ry * np.sin(angle) * 0.8) * rows
    center_col = (cx + radial * rx * np.cos(angle)) * columns
    size = min(rows, columns)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)

    if kind == NODULE:
        radius = rng.uniform(0.035, 0.06) * size
        contrast = rng.uniform(0.16, 0.30)
        sigma = radius / 1.5
        added = np.exp(-((yy - center_row) ** 2 + (xx - center_col) ** 2) / sigma**2)
        # A flat top makes a nodule look solid, not like a blurred spot.
        added = np.minimum(1.0, 1.3 * added)
    else:
        radius = rng.uniform(0.08, 0.13) * size
        contrast = rng.uniform(0.13, 0.22)
        added = np.zeros((rows, columns))
        for _ in range(4):
            dy, dx = rng.normal(0.0, 0.35 * radius, size=2)
            sigma = radius * rng.uniform(0.45, 0.7)
            blob = np.exp(
                -((yy - center_row - dy) ** 2 + (xx - center_col - dx) ** 2) / sigma**2
            )
            added = np.maximum(added, blob)
    return contrast * added, center_row, center_col, radius, contrast


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def synthesize_chest(
    rng: np.random.Generator, rows: int, columns: int, finding_count: int
) -> Phantom:
    """Draw a chest-like radiograph with ``finding_count`` lesions in the lungs.

    The background has a body outline, two lungs cut by the diaphragm, the heart,
    spine and rib shadows, smooth texture and pixel noise. Each lesion is a nodule
    (small, solid, higher contrast) or an opacity (larger, patchy, lower contrast).

    Parameters
    ----------
    rng
        Source of every random draw, so one generator state gives one phantom.
    rows, columns
        Image size in pixels.
    finding_count
        Number of lesions, 0 for a normal image.

    Returns
    -------
    Phantom
        Brightness in [0, 1] (float64, 1 is bright), the findings with boxes in
        pixel coordinates, and the union of their masks (bool).

    Raises
    ------
    ValueError
        If the size is below 64 pixels or ``finding_count`` is negative.
    """
    if rows < 64 or columns < 64:
        raise ValueError(f"phantom size {rows}x{columns} is below the minimum 64x64")
    if finding_count < 0:
        raise ValueError(f"finding_count must be >= 0, got {finding_count}")

    brightness, _, ellipses = _anatomy(rng, rows, columns)
    mask = np.zeros((rows, columns), dtype=bool)
    findings = []
    for _ in range(finding_count):
        kind = NODULE if rng.uniform() < 0.5 else OPACITY
        added, center_row, center_col, radius, contrast = _place_finding(
            rng, kind, rows, columns, ellipses
        )
        lesion_mask = added >= MASK_FRACTION * contrast
        brightness += added
        mask |= lesion_mask
        findings.append(
            Finding(
                kind=kind,
                center_row=round(float(center_row), 2),
                center_col=round(float(center_col), 2),
                radius_px=round(float(radius), 2),
                contrast=round(float(contrast), 4),
                box=_box_of(lesion_mask),
                mask_pixels=int(lesion_mask.sum()),
            )
        )

    brightness += rng.normal(0.0, rng.uniform(0.008, 0.018), size=brightness.shape)
    np.clip(brightness, 0.0, 1.0, out=brightness)
    return Phantom(brightness=brightness, findings=tuple(findings), mask=mask)
