"""Decoder plugin preferred per transfer syntax, with fallback to pydicom's order."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from clinfer.workers.dicom_io import decode_frames
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array


@pytest.mark.parametrize(
    "name",
    ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "JPGExtended.dcm"],
)
def test_preferred_plugin_matches_gdcm_or_default(name: str) -> None:
    path = get_testdata_file(name)
    _, frames = decode_frames(path)
    reference = pixel_array(dcmread(path))
    assert np.array_equal(frames[0], reference)


def test_12_bit_jpeg_logs_no_decoder_error(caplog: pytest.LogCaptureFixture) -> None:
    path = get_testdata_file("JPGExtended.dcm")
    with caplog.at_level(logging.ERROR, logger="pydicom"):
        decode_frames(path)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
