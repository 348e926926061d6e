"""Turn decoded DICOM frames into normalised float32 model inputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import pydicom
from clinfer.workers import reasons
from clinfer.workers.dicom_io import decode_frames
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from clinfer.errors import DicomInputError, ModelSpecError
from clinfer.privacy import short_hash

logger = logging.getLogger(__name__)

RESIZE_METHOD = "pad_square_bilinear"
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class PreprocessConfig:
    """Model input size in pixels."""

    height: int = 224
    width: int = 224

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"PreprocessConfig.{name} must be a positive integer, got "
                    f"{value!r}."
                )

    @classmethod
    def from_spec(cls, spec_input: Mapping[str, Any]) -> PreprocessConfig:
        """Build the configuration from the input section of a model spec.

        Parameters
        ----------
        spec_input : Mapping
            The spec's input description with integer ``"height"`` and
            ``"width"``. Other keys are ignored.

        Returns
        -------
        PreprocessConfig
            The configuration for that input size.

        Raises
        ------
        ModelSpecError
            If height or width is missing or not a positive integer.
        """
        missing = [key for key in ("height", "width") if key not in spec_input]
        if missing:
            raise ModelSpecError(
                f"The model spec's input has no {' or '.join(missing)}. Add the "
                "model's input size in pixels to the spec."
            )
        try:
            return cls(height=spec_input["height"], width=spec_input["width"])
        except ValueError as exc:
            raise ModelSpecError(
                f"The model spec's input size is invalid: {exc} Fix the spec."
            ) from exc


@dataclass
class PreprocessedInstance:
    """Model inputs of one instance, with what was applied and how long it took."""

    frames: np.ndarray
    """float32 array of shape (frames, 1, height, width), values in [0, 1]."""
    settings: dict[str, Any]
    """Settings of frame 0, which match the other frames because the VOI and
    modality LUT attributes are read once per instance."""
    decode_ms: float
    preprocess_ms: float


def preprocess_frame(
    frame: np.ndarray, ds: pydicom.Dataset, config: PreprocessConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """Convert one frame of stored values into a model input.

    The steps, with the ``pydicom.pixels`` functions named:

    1. The Modality LUT Sequence or rescale (``apply_modality_lut``).
    2. The VOI LUT Sequence (``apply_voi``), else the first window
       (``apply_windowing``, honouring VOILUTFunction), else the frame's
       min-max range.
    3. Scaling to [0, 1] by the output range of step 2: the window's output
       bounds, the min and max of the LUT data, or the frame's min and max. A
       constant frame gives zeros.
    4. ``1 - x`` for MONOCHROME1.
    5. Zero padding to a centred square and a bilinear resize with Pillow.

    Parameters
    ----------
    frame : numpy.ndarray
        Stored values of shape (rows, columns), as one frame of
        :func:`clinfer.workers.dicom_io.decode_frames`.
    ds : pydicom.Dataset
        The dataset the frame belongs to.
    config : PreprocessConfig
        The output size.

    Returns
    -------
    numpy.ndarray
        float32 array of shape (1, height, width) with values in [0, 1], where 1
        is bright as in MONOCHROME2. Padding is 0.
    dict
        JSON-serialisable settings: ``modality_lut`` ("rescale", "lut" or
        "none"), ``rescale_slope``, ``rescale_intercept``, ``voi`` ("window",
        "voi_lut" or "min_max"), ``window_center``, ``window_width``,
        ``voi_lut_function``, ``monochrome1_inverted``, ``input_size`` ([rows,
        columns]) and ``resize``. Values that do not apply are None.

    Raises
    ------
    ValueError
        If the frame is not 2-D, PhotometricInterpretation is not MONOCHROME1 or
        MONOCHROME2, RescaleSlope or RescaleIntercept is present without a
        value, or pydicom rejects the window (for example WindowWidth < 1 with
        VOILUTFunction LINEAR).

    Notes
    -----
    Only the top-level Modality LUT and VOI LUT module attributes are used. The
    per-frame values of enhanced multi-frame objects (in
    SharedFunctionalGroupsSequence and PerFrameFunctionalGroupsSequence) are not
    applied, so such frames fall back to min-max scaling.
    """
    if frame.ndim != 2:
        raise ValueError(
            f"preprocess_frame needs one single-channel frame of shape (rows, "
            f"columns), got shape {frame.shape}. Reject colour images with "
            "check_acceptance before preprocessing."
        )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in MONOCHROME:
        raise ValueError(
            f"PhotometricInterpretation {photometric!r} is not MONOCHROME1 or "
            "MONOCHROME2, so the frame has no grey-scale meaning. Reject it with "
            "check_acceptance before preprocessing."
        )

    values, modality_settings = _apply_modality_lut(frame, ds)
    scaled, voi_settings = _apply_voi_and_scale(values, ds)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        scaled = 1.0 - scaled
    output = _pad_and_resize(scaled.astype(np.float32), config)

    settings: dict[str, Any] = {
        **modality_settings,
        **voi_settings,
        "monochrome1_inverted": inverted,
        "input_size": [int(frame.shape[0]), int(frame.shape[1])],
        "resize": RESIZE_METHOD,
    }
    return output, settings


def load_and_preprocess(
    path: str | PathLike[str], config: PreprocessConfig, *, strict: bool = False
) -> PreprocessedInstance:
    """Decode a DICOM file and preprocess each of its frames.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    config : PreprocessConfig
        The output size.
    strict : bool, optional
        Whether to reject files without the DICOM preamble, as in
        :func:`clinfer.workers.dicom_io.read_header`.

    Returns
    -------
    PreprocessedInstance
        One model input per frame, the settings of frame 0 and the decode and
        preprocessing times in milliseconds.

    Raises
    ------
    DicomInputError
        With a reason of :func:`clinfer.workers.dicom_io.decode_frames`, or
        PREPROCESS_FAILED, naming the exception, when a frame cannot be
        preprocessed.
    OSError
        If the file cannot be opened.
    """
    start = time.perf_counter()
    ds, frames = decode_frames(path, strict=strict)
    decoded = time.perf_counter()

    outputs: list[np.ndarray] = []
    settings: dict[str, Any] = {}
    try:
        for index, frame in enumerate(frames):
            output, frame_settings = preprocess_frame(frame, ds, config)
            outputs.append(output)
            if index == 0:
                settings = frame_settings
    except Exception as exc:
        # Anything raised here is reported per file instead of stopping the batch.
        raise DicomInputError(
            reasons.PREPROCESS_FAILED,
            f"Preprocessing {path} failed with {type(exc).__name__}: {exc}",
        ) from exc
    finished = time.perf_counter()

    logger.debug(
        "Preprocessed file %s: %d frame(s), decode %.1f ms, preprocess %.1f ms",
        short_hash(path),
        len(outputs),
        (decoded - start) * 1000,
        (finished - decoded) * 1000,
    )
    return PreprocessedInstance(
        frames=np.stack(outputs),
        settings=settings,
        decode_ms=(decoded - start) * 1000,
        preprocess_ms=(finished - decoded) * 1000,
    )


def _apply_modality_lut(
    frame: np.ndarray, ds: pydicom.Dataset
) -> tuple[np.ndarray, dict[str, Any]]:
    settings: dict[str, Any] = {
        "modality_lut": "none",
        "rescale_slope": None,
        "rescale_intercept": None,
    }
    if ds.get("ModalityLUTSequence"):
        settings["modality_lut"] = "lut"
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope = ds.RescaleSlope
        intercept = ds.RescaleIntercept
        if slope is None or intercept is None:
            raise ValueError(
                f"RescaleSlope {slope!r} and RescaleIntercept {intercept!r} must "
                "both have a value when present. Fix the attributes or re-export "
                "the study from PACS."
            )
        settings["modality_lut"] = "rescale"
        settings["rescale_slope"] = float(slope)
        settings["rescale_intercept"] = float(intercept)
    # apply_modality_lut returns the frame unchanged when neither is present.
    return apply_modality_lut(frame, ds), settings


def _apply_voi_and_scale(
    values: np.ndarray, ds: pydicom.Dataset
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply the VOI LUT, window or min-max range and scale the result to [0, 1]."""
    settings: dict[str, Any] = {
        "voi": "min_max",
        "window_center": None,
        "window_width": None,
        "voi_lut_function": None,
    }
    if _has_voi_lut(ds):
        settings["voi"] = "voi_lut"
        # LUT entries are indexed by integer input values.
        indices = np.rint(values).astype(np.int64)
        output = apply_voi(indices, ds, index=0)
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries = int(descriptor[0]) or 2**16
        first_mapped = int(descriptor[1])
        lut = apply_voi(np.arange(first_mapped, first_mapped + entries), ds, index=0)
        low, high = float(lut.min()), float(lut.max())
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        settings["voi"] = "window"
        settings["window_center"] = _first_value(ds.WindowCenter)
        settings["window_width"] = _first_value(ds.WindowWidth)
        settings["voi_lut_function"] = str(ds.get("VOILUTFunction") or "LINEAR")
        output = apply_windowing(values, ds, index=0)
        # The window maps -inf and +inf to its output bounds, which depend on
        # BitsStored, PixelRepresentation and the modality LUT.
        bounds = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
        low, high = float(bounds[0]), float(bounds[1])
    else:
        output = values
        low, high = float(np.min(values)), float(np.max(values))

    if high == low:
        return np.zeros(values.shape, dtype=np.float64), settings
    scaled = (np.asarray(output, dtype=np.float64) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0), settings


def _has_voi_lut(ds: pydicom.Dataset) -> bool:
    """Return whether ``apply_voi_lut`` would use the VOI LUT Sequence."""
    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return False
    item = sequence[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _first_value(value: Any) -> float:
    """Return the first value of a possibly multi-valued DS attribute."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def _pad_and_resize(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    rows, columns = image.shape
    side = max(rows, columns)
    padded = np.zeros((side, side), dtype=np.float32)
    top = (side - rows) // 2
    left = (side - columns) // 2
    padded[top : top + rows, left : left + columns] = image

    # A 2-D float32 array becomes a Pillow image of mode "F".
    resized = Image.fromarray(padded).resize(
        (config.width, config.height), resample=Image.Resampling.BILINEAR
    )
    output = np.asarray(resized, dtype=np.float32)
    return np.clip(output, 0.0, 1.0)[np.newaxis]
