"""Write a heatmap overlay on the source radiograph as a DICOM Secondary Capture."""

from __future__ import annotations

import logging
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from clinfer.dicom_out.result import ModelResult
from clinfer.dicom_out.sr import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    derived_uid,
    series_description,
    uid_hash,
)
from clinfer.errors import DicomOutputError
from clinfer.workers.preprocess import PreprocessConfig, preprocess_frame

logger = logging.getLogger(__name__)

SC_SERIES_NUMBER = 9002
OVERLAY_COLOUR = (1.0, 0.0, 0.0)
MAX_OVERLAY_ALPHA = 0.6
# Preprocessed frames that differ from a fresh preprocessing of the source by more
# than this were made from another image or with other settings.
FRAME_TOLERANCE = 1e-4


def pad_geometry(rows: int, columns: int) -> tuple[int, int, int]:
    """Return (side, top, left) of the centred zero padding to a square.

    This is the padding of ``clinfer.workers.preprocess.preprocess_frame``: the
    image goes into a ``side`` x ``side`` square, ``side = max(rows, columns)``,
    at row ``top`` and column ``left``.
    """
    side = max(rows, columns)
    return side, (side - rows) // 2, (side - columns) // 2


def heatmap_to_source(heatmap: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Map a heatmap aligned to the preprocessed input onto the source geometry.

    Preprocessing pads the source image to a centred square and resizes the square
    bilinearly to the model input. This undoes both steps: a bilinear resize of the
    heatmap back to the square (Pillow, like the forward resize), then a crop of
    the padding.

    Parameters
    ----------
    heatmap
        2-D float array of the model input's height and width.
    rows, columns
        Size of the source image.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (rows, columns).

    Raises
    ------
    ValueError
        If ``heatmap`` is not 2-D or not finite.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (height, width), got {heatmap.shape}")
    if not np.all(np.isfinite(heatmap)):
        raise ValueError("heatmap contains NaN or infinite values")
    side, top, left = pad_geometry(rows, columns)
    square = Image.fromarray(heatmap).resize(
        (side, side), resample=Image.Resampling.BILINEAR
    )
    return np.asarray(square, dtype=np.float32)[top : top + rows, left : left + columns]


def source_grey(source_dataset: Dataset) -> np.ndarray:
    """Return frame 0 of the source in [0, 1], 1 bright, at its own size.

    The grey values are those the model saw before the resize: modality LUT, VOI
    LUT or window, scaling and MONOCHROME1 inversion by ``preprocess_frame``.

    Raises
    ------
    DicomOutputError
        If the pixel data cannot be decoded or preprocessed.
    """
    try:
        frame = _frame0(source_dataset)
        rows, columns = frame.shape
        side, top, left = pad_geometry(rows, columns)
        # A resize to the padded square's own size leaves it unchanged.
        square, _ = preprocess_frame(
            frame, source_dataset, PreprocessConfig(side, side)
        )
    except (ValueError, RuntimeError, AttributeError, NotImplementedError) as exc:
        raise DicomOutputError(
            f"the source image {uid_hash(str(source_dataset.get('SOPInstanceUID')))} "
            f"could not be decoded or preprocessed: {exc}"
        ) from exc
    return square[0, top : top + rows, left : left + columns]


def overlay_rgb(grey: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a heatmap in red over a grey image; return uint8 RGB.

    The heatmap is scaled by its maximum (negative values count as 0), and each
    pixel becomes ``(1 - a) * grey + a * red`` with ``a = 0.6 * scaled``. Where the
    heatmap is 0 the pixel stays grey (R = G = B).

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if grey.shape != heatmap.shape:
        raise ValueError(
            f"grey image {grey.shape} and heatmap {heatmap.shape} differ in shape"
        )
    positive = np.clip(heatmap, 0.0, None)
    peak = float(positive.max())
    scaled = positive / peak if peak > 0 else positive
    alpha = (MAX_OVERLAY_ALPHA * scaled)[..., np.newaxis]
    colour = np.asarray(OVERLAY_COLOUR, dtype=np.float32)
    rgb = (1.0 - alpha) * grey[..., np.newaxis] + alpha * colour
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _check_frame(
    source_dataset: Dataset, preprocessed_frame: np.ndarray, heatmap: np.ndarray
) -> np.ndarray:
    """Check the frame against the heatmap and the source; return it as 2-D."""
    frame = np.asarray(preprocessed_frame, dtype=np.float32)
    if frame.ndim == 3 and frame.shape[0] == 1:
        frame = frame[0]
    if frame.ndim != 2:
        raise DicomOutputError(
            f"preprocessed_frame must have shape (1, H, W) or (H, W), got "
            f"{preprocessed_frame.shape}"
        )
    if frame.shape != heatmap.shape:
        raise DicomOutputError(
            f"heatmap shape {heatmap.shape} differs from the preprocessed frame "
            f"{frame.shape}; compute the heatmap on the model input"
        )
    height, width = frame.shape
    try:
        expected, _ = preprocess_frame(
            _frame0(source_dataset), source_dataset, PreprocessConfig(height, width)
        )
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise DicomOutputError(f"preprocessing the source image failed: {exc}") from exc
    difference = float(np.max(np.abs(expected[0] - frame)))
    if difference > FRAME_TOLERANCE:
        raise DicomOutputError(
            f"preprocessed_frame differs from the preprocessed source image by up to "
            f"{difference:.3g}; pass the frame made from this source dataset"
        )
    return frame


def _frame0(source_dataset: Dataset) -> np.ndarray:
    frames = source_dataset.pixel_array
    return frames[0] if frames.ndim == 3 else frames


def build_heatmap_capture(
    source_dataset: Dataset,
    preprocessed_frame: np.ndarray,
    heatmap: np.ndarray,
    result: ModelResult,
) -> hd.sc.SCImage:
    """Build an RGB Secondary Capture of the heatmap over the source image.

    The SC image has the source's rows and columns, its patient and study
    attributes, and a Source Image Sequence naming the source instance. Its
    SeriesDescription, DerivationDescription and ImageComments name the model,
    version and weights SHA-256. BurnedInAnnotation is NO because no text is drawn.

    Raises
    ------
    DicomOutputError
        If the frame or heatmap do not fit the source (shape, or a frame not made
        from this source), the pixel data cannot be decoded, or highdicom rejects
        the image.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim == 3 and heatmap.shape[0] == 1:
        heatmap = heatmap[0]
    _check_frame(source_dataset, preprocessed_frame, heatmap)
    grey = source_grey(source_dataset)
    try:
        mapped = heatmap_to_source(heatmap, *grey.shape)
    except ValueError as exc:
        raise DicomOutputError(str(exc)) from exc
    rgb = overlay_rgb(grey, mapped)

    source_uid = str(source_dataset.SOPInstanceUID)
    description = (
        f"Heatmap of {result.model_name} v{result.model_version} "
        f"(weights sha256 {result.weights_sha256}) over the source image, score "
        f"{result.score:.4f}, threshold {result.threshold:.4f}, {result.label}. "
        f"{NOT_FOR_DIAGNOSTIC_USE}"
    )
    try:
        capture = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source_dataset,
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=derived_uid(result, source_uid, "sc-series"),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=derived_uid(result, source_uid, "sc-instance"),
            instance_number=int(source_dataset.get("InstanceNumber") or 1),
            manufacturer=MANUFACTURER,
            patient_orientation=tuple(source_dataset.get("PatientOrientation") or ())
            or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description(result, "SC"),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise DicomOutputError(
            f"highdicom rejected the secondary capture of instance "
            f"{uid_hash(source_uid)} for model {result.model_name}: {exc}"
        ) from exc
    capture.BurnedInAnnotation = "NO"
    # Without BodyPartExamined, dciodvfy (dicom3tools 1.00~20220618) cannot rule
    # out a paired body part and reports Laterality as missing.
    if source_dataset.get("BodyPartExamined"):
        capture.BodyPartExamined = source_dataset.BodyPartExamined
    capture.ImageType = ["DERIVED", "SECONDARY"]
    capture.DerivationDescription = description[:1024]
    capture.ImageComments = description
    source = Dataset()
    source.ReferencedSOPClassUID = source_dataset.SOPClassUID
    source.ReferencedSOPInstanceUID = source_uid
    capture.SourceImageSequence = [source]
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = source_dataset.SeriesInstanceUID
    referenced_series.ReferencedInstanceSequence = [source]
    capture.ReferencedSeriesSequence = [referenced_series]
    return capture


def write_heatmap_capture(
    source_dataset: Dataset,
    preprocessed_frame: np.ndarray,
    heatmap: np.ndarray,
    result: ModelResult,
    out_path: Path,
) -> Path:
    """Write the Secondary Capture of ``build_heatmap_capture`` to ``out_path``.

    Parameters
    ----------
    source_dataset
        The scored instance with its pixel data (single frame, MONOCHROME1 or
        MONOCHROME2). Only frame 0 of a multi-frame instance is drawn.
    preprocessed_frame
        The model input made from it, shape (1, H, W) or (H, W), as
        ``clinfer.workers.preprocess.preprocess_frame`` returns it. It is checked
        against a fresh preprocessing of the source.
    heatmap
        Float array of shape (H, W) aligned to ``preprocessed_frame``; larger is
        more salient.
    result
        The model result and identity.
    out_path
        File to write; its folder is created.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Raises
    ------
    DicomOutputError
        If the image cannot be built (see ``build_heatmap_capture``) or written.
    """
    capture = build_heatmap_capture(source_dataset, preprocessed_frame, heatmap, result)
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        capture.save_as(out_path, enforce_file_format=True)
    except OSError as exc:
        raise DicomOutputError(
            f"writing the secondary capture to {out_path} failed: {exc}; check that "
            "the folder is writable"
        ) from exc
    logger.debug(
        "Wrote heatmap SC for instance %s, model %s v%s, to %s",
        uid_hash(str(source_dataset.SOPInstanceUID)),
        result.model_name,
        result.model_version,
        out_path,
    )
    return out_path
