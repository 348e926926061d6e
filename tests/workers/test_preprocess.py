"""Tests of workers/preprocess.py on the pydicom and pydicom-data test corpus."""

from __future__ import annotations

import copy
import json

import numpy as np
import pydicom
import pytest
from clinfer.workers import reasons
from clinfer.workers.dicom_io import decode_frames
from clinfer.workers.preprocess import (
    PreprocessConfig,
    load_and_preprocess,
    preprocess_frame,
)

from clinfer.corpus import find_test_file
from clinfer.errors import DicomInputError, ModelSpecError

SETTINGS_KEYS = {
    "modality_lut",
    "rescale_slope",
    "rescale_intercept",
    "voi",
    "window_center",
    "window_width",
    "voi_lut_function",
    "monochrome1_inverted",
    "input_size",
    "resize",
}

# A 16x16 CR image, MONOCHROME1 with RescaleSlope, RescaleIntercept and a window.
CR_MONOCHROME1 = "dicomdirtests/77654033/CR1/6154"


def _decoded(name: str) -> tuple[pydicom.Dataset, np.ndarray]:
    return decode_frames(find_test_file(name))


def _same_size(frame: np.ndarray) -> PreprocessConfig:
    """Return a config that keeps a square frame's size, so no resampling happens."""
    rows, columns = frame.shape
    assert rows == columns
    return PreprocessConfig(height=rows, width=columns)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply the LINEAR window of DICOM PS3.3 C.11.2.1.2.1, scaled to [0, 1]."""
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _lut_values(item: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Map values through a LUT item with LUTDescriptor and LUTData (VR US)."""
    entries, first_mapped, _ = (int(value) for value in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    indices = np.clip(stored.astype(np.int64) - first_mapped, 0, entries - 1)
    return lut[indices]


# Output contract


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        CR_MONOCHROME1,
        "vlut_04.dcm",
        "mlut_18.dcm",
        "JPEG2000_UNC.dcm",
        "693_J2KR.dcm",
        "RG3_J2KI.dcm",
    ],
)
def test_output_contract(name: str) -> None:
    instance = load_and_preprocess(find_test_file(name), PreprocessConfig())
    assert instance.frames.shape == (1, 1, 224, 224)
    assert instance.frames.dtype == np.float32
    assert instance.frames.min() >= 0.0
    assert instance.frames.max() <= 1.0
    assert set(instance.settings) == SETTINGS_KEYS


def test_output_custom_size() -> None:
    config = PreprocessConfig(height=96, width=128)
    instance = load_and_preprocess(find_test_file("CT_small.dcm"), config)
    assert instance.frames.shape == (1, 1, 96, 128)


def test_settings_json_round_trip() -> None:
    instance = load_and_preprocess(find_test_file("693_J2KR.dcm"), PreprocessConfig())
    assert json.loads(json.dumps(instance.settings)) == instance.settings


def test_settings_input_size() -> None:
    instance = load_and_preprocess(
        find_test_file("JPEG2000_UNC.dcm"), PreprocessConfig()
    )
    assert instance.settings["input_size"] == [1024, 256]


def test_timings_recorded() -> None:
    instance = load_and_preprocess(find_test_file("MR_small.dcm"), PreprocessConfig())
    assert instance.decode_ms > 0.0
    assert instance.preprocess_ms > 0.0


def test_multiframe_one_per_frame() -> None:
    instance = load_and_preprocess(find_test_file("emri_small.dcm"), PreprocessConfig())
    assert instance.frames.shape == (10, 1, 224, 224)


def test_multiframe_frames_distinct() -> None:
    instance = load_and_preprocess(find_test_file("emri_small.dcm"), PreprocessConfig())
    assert not np.array_equal(instance.frames[0], instance.frames[9])


def test_multiframe_32bit_dose() -> None:
    instance = load_and_preprocess(find_test_file("rtdose.dcm"), PreprocessConfig())
    assert instance.frames.shape == (15, 1, 224, 224)


# Modality LUT and rescale


def test_rescale_recorded() -> None:
    instance = load_and_preprocess(find_test_file("CT_small.dcm"), PreprocessConfig())
    assert instance.settings["modality_lut"] == "rescale"
    assert instance.settings["rescale_slope"] == 1.0
    assert instance.settings["rescale_intercept"] == -1024.0


def test_rescale_applied_before_window() -> None:
    # 693_UNCR.dcm: RescaleIntercept -1024 and a soft-tissue window 40/100 in HU,
    # so the output is only right if the rescale comes first.
    ds, frames = _decoded("693_UNCR.dcm")
    stored = frames[0].astype(np.float64)
    hounsfield = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = _linear_window(hounsfield, float(ds.WindowCenter), float(ds.WindowWidth))
    output, _ = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert np.allclose(output[0], expected, atol=1e-6)


def test_no_modality_lut_recorded() -> None:
    instance = load_and_preprocess(find_test_file("MR_small.dcm"), PreprocessConfig())
    assert instance.settings["modality_lut"] == "none"
    assert instance.settings["rescale_slope"] is None


def test_modality_lut_values() -> None:
    # mlut_18.dcm has a ModalityLUTSequence and no VOI attributes, so the output is
    # the LUT output scaled by its own min-max.
    ds, frames = _decoded("mlut_18.dcm")
    mapped = _lut_values(ds.ModalityLUTSequence[0], frames[0])
    expected = (mapped - mapped.min()) / (mapped.max() - mapped.min())
    output, settings = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert settings["modality_lut"] == "lut"
    assert np.allclose(output[0], expected, atol=1e-6)


def test_empty_rescale_raises() -> None:
    ds, frames = _decoded("CT_small.dcm")
    ds = copy.deepcopy(ds)
    ds.RescaleSlope = None
    with pytest.raises(ValueError, match="RescaleSlope"):
        preprocess_frame(frames[0], ds, PreprocessConfig())


# VOI LUT, window and min-max


def test_window_values() -> None:
    ds, frames = _decoded("MR_small.dcm")
    expected = _linear_window(
        frames[0].astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)
    )
    output, settings = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert settings["voi"] == "window"
    assert np.allclose(output[0], expected, atol=1e-6)


def test_window_settings_recorded() -> None:
    instance = load_and_preprocess(find_test_file("MR_small.dcm"), PreprocessConfig())
    assert instance.settings["window_center"] == 600.0
    assert instance.settings["window_width"] == 1600.0
    assert instance.settings["voi_lut_function"] == "LINEAR"


def test_sigmoid_window_values() -> None:
    ds, frames = _decoded("MR_small.dcm")
    ds = copy.deepcopy(ds)
    ds.VOILUTFunction = "SIGMOID"
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    # PS3.3 C.11.2.1.3.1, scaled to [0, 1].
    values = frames[0].astype(np.float64)
    expected = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    output, settings = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert settings["voi_lut_function"] == "SIGMOID"
    assert np.allclose(output[0], expected, atol=1e-6)


def test_invalid_window_width_raises() -> None:
    ds, frames = _decoded("MR_small.dcm")
    ds = copy.deepcopy(ds)
    ds.WindowWidth = 0
    with pytest.raises(ValueError, match="Window Width"):
        preprocess_frame(frames[0], ds, PreprocessConfig())


def test_voi_lut_values() -> None:
    # vlut_04.dcm has a VOILUTSequence and no modality LUT, so the output is the
    # LUT output scaled by the min-max of the LUT data.
    ds, frames = _decoded("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = (_lut_values(item, frames[0]) - lut.min()) / (lut.max() - lut.min())
    output, settings = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert settings["voi"] == "voi_lut"
    assert np.allclose(output[0], expected, atol=1e-6)


def test_voi_lut_preferred_over_window() -> None:
    ds, frames = _decoded("vlut_04.dcm")
    ds = copy.deepcopy(ds)
    ds.WindowCenter = 100
    ds.WindowWidth = 50
    _, settings = preprocess_frame(frames[0], ds, PreprocessConfig())
    assert settings["voi"] == "voi_lut"


def test_min_max_fallback() -> None:
    ds, frames = _decoded("emri_small.dcm")
    frame = frames[0].astype(np.float64)
    expected = (frame - frame.min()) / (frame.max() - frame.min())
    output, settings = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert settings["voi"] == "min_max"
    assert np.allclose(output[0], expected, atol=1e-6)


def test_constant_frame_zeros() -> None:
    ds, frames = _decoded("emri_small.dcm")
    constant = np.full_like(frames[0], 700)
    output, _ = preprocess_frame(constant, ds, PreprocessConfig())
    assert not output.any()


# MONOCHROME1


def test_monochrome1_inverted() -> None:
    ds, frames = _decoded(CR_MONOCHROME1)
    as_monochrome2 = copy.deepcopy(ds)
    as_monochrome2.PhotometricInterpretation = "MONOCHROME2"
    config = _same_size(frames[0])
    inverted, settings = preprocess_frame(frames[0], ds, config)
    upright, _ = preprocess_frame(frames[0], as_monochrome2, config)
    assert settings["monochrome1_inverted"] is True
    assert np.allclose(inverted, 1.0 - upright, atol=1e-6)


def test_monochrome2_not_inverted() -> None:
    instance = load_and_preprocess(find_test_file("CT_small.dcm"), PreprocessConfig())
    assert instance.settings["monochrome1_inverted"] is False


def test_monochrome1_window_inverted() -> None:
    # RG1_UNCR.dcm is a 1955x1841 MONOCHROME1 CR image with a window. A square
    # config of the longer side keeps the pixels unresampled, with the columns
    # centred between zero padding.
    ds, frames = _decoded("RG1_UNCR.dcm")
    rows, columns = frames.shape[1:]
    side = max(rows, columns)
    left = (side - columns) // 2
    expected = 1.0 - _linear_window(
        frames[0].astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)
    )
    output, _ = preprocess_frame(frames[0], ds, PreprocessConfig(side, side))
    assert rows == side
    assert np.allclose(output[0, :, left : left + columns], expected, atol=1e-6)


# Padding and resize


def test_non_square_padded() -> None:
    # JPEG2000_UNC.dcm is 1024 rows x 256 columns: padded to 1024x1024, the image
    # covers columns 84-140 of 224 and the rest stays 0.
    instance = load_and_preprocess(
        find_test_file("JPEG2000_UNC.dcm"), PreprocessConfig()
    )
    frame = instance.frames[0, 0]
    assert not frame[:, :80].any()
    assert not frame[:, 145:].any()
    assert frame[:, 100:124].any()


def test_same_size_no_resampling() -> None:
    ds, frames = _decoded("emri_small.dcm")
    output, _ = preprocess_frame(frames[0], ds, _same_size(frames[0]))
    assert output.shape == (1, 64, 64)


# Rejected input


def test_colour_frame_rejected() -> None:
    with pytest.raises(DicomInputError) as caught:
        load_and_preprocess(find_test_file("SC_rgb.dcm"), PreprocessConfig())
    assert caught.value.reason == reasons.PREPROCESS_FAILED


def test_palette_colour_rejected() -> None:
    ds, frames = _decoded("OBXXXX1A.dcm")
    with pytest.raises(ValueError, match="PALETTE COLOR"):
        preprocess_frame(frames[0], ds, PreprocessConfig())


def test_decode_reason_passed_through() -> None:
    with pytest.raises(DicomInputError) as caught:
        load_and_preprocess(find_test_file("MR_truncated.dcm"), PreprocessConfig())
    assert caught.value.reason == reasons.TRUNCATED


# Configuration


def test_config_from_spec() -> None:
    config = PreprocessConfig.from_spec({"name": "image", "height": 256, "width": 128})
    assert config == PreprocessConfig(height=256, width=128)


@pytest.mark.parametrize(
    "spec_input",
    [
        pytest.param({"height": 224}, id="no_width"),
        pytest.param({"height": 0, "width": 224}, id="zero"),
        pytest.param({"height": 224.0, "width": 224}, id="float"),
        pytest.param({"height": True, "width": 224}, id="bool"),
    ],
)
def test_config_from_bad_spec(spec_input: dict[str, object]) -> None:
    with pytest.raises(ModelSpecError):
        PreprocessConfig.from_spec(spec_input)
