"""Tests of workers/dicom_io.py on the pydicom and pydicom-data test corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from clinfer.workers import reasons
from clinfer.workers.dicom_io import (
    check_acceptance,
    decode_frames,
    is_dicom_suffix,
    read_header,
)
from pydicom.encaps import generate_frames
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from clinfer.corpus import find_test_file
from clinfer.errors import DicomInputError, ModelSpecError

MONOCHROME_ONLY = {
    "modalities": ["*"],
    "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
    "samples_per_pixel": [1],
}

# Pairs of (uncompressed file, the same image in a lossless or native encoding).
LOSSLESS_TWINS = [
    pytest.param("MR_small.dcm", "MR_small_RLE.dcm", id="mr_rle"),
    pytest.param("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", id="mr_jpeg_ls"),
    pytest.param("MR_small.dcm", "MR_small_jp2klossless.dcm", id="mr_j2k_lossless"),
    pytest.param("MR_small.dcm", "MR_small_bigendian.dcm", id="mr_big_endian"),
    pytest.param("MR_small.dcm", "MR_small_expb.dcm", id="mr_expb"),
    pytest.param("MR_small.dcm", "MR_small_implicit.dcm", id="mr_implicit"),
    pytest.param("emri_small.dcm", "emri_small_RLE.dcm", id="emri_rle"),
    pytest.param(
        "emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", id="emri_jpeg_ls"
    ),
    pytest.param(
        "emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", id="emri_j2k_lossless"
    ),
    pytest.param("emri_small.dcm", "emri_small_big_endian.dcm", id="emri_big_endian"),
    pytest.param("RG1_UNCR.dcm", "RG1_J2KR.dcm", id="rg1_j2k_lossless"),
    pytest.param("RG3_UNCR.dcm", "RG3_J2KR.dcm", id="rg3_j2k_lossless"),
    pytest.param("MR2_UNCR.dcm", "MR2_J2KR.dcm", id="mr2_j2k_lossless"),
    pytest.param("US1_UNCR.dcm", "US1_J2KR.dcm", id="us1_j2k_lossless_ybr_rct"),
    pytest.param("693_UNCR.dcm", "693_J2KR.dcm", id="693_j2k_lossless"),
    pytest.param("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", id="rgb_jpeg_lossless_sv1"),
    pytest.param("SC_rgb.dcm", "SC_rgb_rle.dcm", id="rgb_rle"),
    pytest.param("rtdose.dcm", "rtdose_rle.dcm", id="rtdose_rle_32bit"),
    pytest.param("rtdose.dcm", "rtdose_expb.dcm", id="rtdose_expb_32bit"),
    pytest.param("liver.dcm", "liver_expb.dcm", id="liver_expb_1bit"),
]

# Pairs of (another decoder's output, the lossy codestream it was decoded from).
# Per their file meta ImplementationVersionName, the *_UNCI files and
# JPEG2000_UNC.dcm were decompressed by GDCM 2.8.4 (gdcmconv) and the *_dcmd
# files by DCMTK 3.6.1. Decoders of the same lossy stream may round the inverse
# wavelet or DCT and the colour conversion differently, so 1 unit per sample is
# allowed. That bound is a choice, not a figure from a standard. With the plugin
# versions pinned in pyproject.toml every pair is identical (measured).
LOSSY_REFERENCE_TOLERANCE = 1
LOSSY_TWINS = [
    pytest.param("MR2_UNCI.dcm", "MR2_J2KI.dcm", id="mr2_j2k"),
    pytest.param("RG1_UNCI.dcm", "RG1_J2KI.dcm", id="rg1_j2k"),
    pytest.param("US1_UNCI.dcm", "US1_J2KI.dcm", id="us1_j2k_ybr_ict"),
    pytest.param("693_UNCI.dcm", "693_J2KI.dcm", id="693_j2k"),
    pytest.param("JPEG2000_UNC.dcm", "JPEG2000.dcm", id="nm_j2k"),
    pytest.param(
        "SC_rgb_dcmtk_ebcr_dcmd.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", id="jpeg_baseline_rgb"
    ),
    pytest.param(
        "SC_rgb_dcmtk_ebcyn1_dcmd.dcm",
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",
        id="jpeg_baseline_ybr_full",
    ),
    pytest.param(
        "SC_rgb_dcmtk_ebcynp_dcmd.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        id="jpeg_baseline_ybr_full_422",
    ),
]

# Pairs of (original, JPEG-LS near-lossless copy of it).
NEAR_LOSSLESS_TWINS = [
    pytest.param("SC_rgb.dcm", "SC_rgb_jls_lossy_line.dcm", id="line_interleaved"),
    pytest.param("SC_rgb.dcm", "SC_rgb_jls_lossy_sample.dcm", id="sample_interleaved"),
]


def _copy_with_uids(name: str, folder: Path) -> Path:
    """Write a corpus file to ``folder`` with generated UIDs where it has none.

    Some JPEG-LS test files have no StudyInstanceUID, SeriesInstanceUID or
    SOPInstanceUID, which read_header rejects with MISSING_UID.
    """
    ds = pydicom.dcmread(find_test_file(name))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            setattr(ds, keyword, generate_uid())
    path = folder / name
    ds.save_as(path)
    return path


def _near_parameter(path: Path) -> int:
    """Return the NEAR parameter of the first JPEG-LS frame in a file."""
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    # _get_jpg_parameters is a private helper of pydicom 3.0.2, which
    # pyproject.toml pins. It parses the JPEG-LS SOS segment and returns NEAR as
    # "lossy_error".
    return int(_get_jpg_parameters(frame)["lossy_error"])


def _reason(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(DicomInputError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value.reason


def _message(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(DicomInputError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return str(caught.value)


# Headers


def test_header_fields_ct_small() -> None:
    path = find_test_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    header = read_header(path)
    assert header.path == str(path)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.sop_class_uid == ds.SOPClassUID
    assert header.modality == "CT"
    assert header.photometric_interpretation == "MONOCHROME2"
    assert header.samples_per_pixel == 1
    assert header.number_of_frames == 1
    assert (header.rows, header.columns) == (128, 128)
    assert header.bits_stored == 16
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian
    assert header.patient_id == ds.PatientID
    assert header.manufacturer == ds.Manufacturer


def test_header_multiframe_count() -> None:
    assert read_header(find_test_file("emri_small.dcm")).number_of_frames == 10


def test_header_repr_hides_patient_id() -> None:
    path = find_test_file("CT_small.dcm")
    patient_id = pydicom.dcmread(path).PatientID
    assert patient_id
    assert patient_id not in repr(read_header(path))


def test_header_without_meta_lenient() -> None:
    header = read_header(find_test_file("OT-PAL-8-face.dcm"))
    assert header.transfer_syntax_uid == ImplicitVRLittleEndian


def test_header_without_meta_strict() -> None:
    path = find_test_file("OT-PAL-8-face.dcm")
    assert _reason(read_header, path, strict=True) == reasons.NOT_DICOM


def test_no_preamble_rtplan_lenient() -> None:
    # Without a preamble but with a SOPInstanceUID, so the lenient read gets as far
    # as the pixel data check.
    path = find_test_file("ExplVR_LitEndNoMeta.dcm")
    assert _reason(read_header, path) == reasons.NON_IMAGE_OBJECT


def test_no_preamble_rtplan_strict() -> None:
    path = find_test_file("ExplVR_LitEndNoMeta.dcm")
    assert _reason(read_header, path, strict=True) == reasons.NOT_DICOM


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("MR_truncated.dcm", reasons.TRUNCATED, id="pixel_data_cut"),
        pytest.param("rtplan_truncated.dcm", reasons.TRUNCATED, id="sequence_cut"),
        pytest.param("rtplan.dcm", reasons.NON_IMAGE_OBJECT, id="rtplan"),
        pytest.param("test-SR.dcm", reasons.NON_IMAGE_OBJECT, id="structured_report"),
        pytest.param(
            "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000",
            reasons.NO_PIXEL_DATA,
            id="ct_image_without_pixels",
        ),
        pytest.param("dicomdirtests/DICOMDIR", reasons.DICOMDIR, id="dicomdir_name"),
        pytest.param(
            "dicomdirtests/DICOMDIR-empty.dcm", reasons.DICOMDIR, id="dicomdir_sop"
        ),
        pytest.param("badVR.dcm", reasons.INVALID_DICOM, id="frames_not_integer"),
        pytest.param("nested_priv_SQ.dcm", reasons.MISSING_UID, id="no_uids"),
        pytest.param("README.txt", reasons.NOT_DICOM, id="text_file"),
        # no_meta.dcm starts with one byte (0x20) before its first element, so
        # even a forced read finds no SOPInstanceUID.
        pytest.param("no_meta.dcm", reasons.NOT_DICOM, id="no_meta_unparseable"),
    ],
)
def test_header_reason(name: str, reason: str) -> None:
    assert _reason(read_header, find_test_file(name)) == reason


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    assert _reason(read_header, path) == reasons.EMPTY_FILE


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
def test_text_named_dcm(tmp_path: Path, strict: bool) -> None:
    path = tmp_path / "report.dcm"
    path.write_text("Patient report exported as text, not as DICOM.\n" * 20)
    assert _reason(read_header, path, strict=strict) == reasons.NOT_DICOM


def test_short_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "short.dcm"
    path.write_bytes(bytes(range(40)))
    assert _reason(read_header, path) == reasons.NOT_DICOM


def test_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "absent.dcm")


def test_truncated_message_names_element() -> None:
    path = find_test_file("MR_truncated.dcm")
    message = _message(read_header, path)
    assert str(path) in message
    assert "PixelData" in message


def test_invalid_message_names_value() -> None:
    message = _message(read_header, find_test_file("badVR.dcm"))
    assert "NumberOfFrames '1A'" in message


def test_message_has_no_patient_id() -> None:
    path = find_test_file("MR_truncated.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    message = _message(decode_frames, path)
    assert ds.PatientID
    assert ds.PatientID not in message
    assert str(ds.PatientName) not in message


# Decoding


def test_decode_single_frame_is_3d() -> None:
    _, frames = decode_frames(find_test_file("CT_small.dcm"))
    assert frames.shape == (1, 128, 128)


def test_decode_multiframe_shape() -> None:
    _, frames = decode_frames(find_test_file("emri_small.dcm"))
    assert frames.shape == (10, 64, 64)


def test_decode_colour_is_4d() -> None:
    _, frames = decode_frames(find_test_file("SC_rgb.dcm"))
    assert frames.shape == (1, 100, 100, 3)


def test_decode_big_endian_native_order() -> None:
    _, frames = decode_frames(find_test_file("MR_small_bigendian.dcm"))
    assert frames.dtype.isnative


def test_decode_returns_dataset() -> None:
    path = find_test_file("CT_small.dcm")
    ds, _ = decode_frames(path)
    assert ds.SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID


@pytest.mark.parametrize(("reference", "twin"), LOSSLESS_TWINS)
def test_lossless_twin_exact(reference: str, twin: str) -> None:
    reference_header = read_header(find_test_file(reference))
    twin_header = read_header(find_test_file(twin))
    assert (twin_header.rows, twin_header.columns) == (
        reference_header.rows,
        reference_header.columns,
    )
    _, expected = decode_frames(find_test_file(reference))
    _, actual = decode_frames(find_test_file(twin))
    assert actual.shape == expected.shape
    assert np.array_equal(actual, expected)


@pytest.mark.parametrize(("reference", "twin"), LOSSY_TWINS)
def test_lossy_twin_within_rounding(reference: str, twin: str) -> None:
    reference_header = read_header(find_test_file(reference))
    twin_header = read_header(find_test_file(twin))
    assert (twin_header.rows, twin_header.columns) == (
        reference_header.rows,
        reference_header.columns,
    )
    _, expected = decode_frames(find_test_file(reference))
    _, actual = decode_frames(find_test_file(twin))
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= LOSSY_REFERENCE_TOLERANCE


@pytest.mark.parametrize(("reference", "twin"), NEAR_LOSSLESS_TWINS)
def test_near_lossless_within_near(tmp_path: Path, reference: str, twin: str) -> None:
    # JPEG-LS near-lossless mode guarantees |decoded - original| <= NEAR for every
    # sample (ISO/IEC 14495-1), so NEAR is the exact bound, not a tolerance.
    twin_path = _copy_with_uids(twin, tmp_path)
    near = _near_parameter(twin_path)
    assert near > 0
    reference_header = read_header(find_test_file(reference))
    twin_header = read_header(twin_path)
    assert (twin_header.rows, twin_header.columns) == (
        reference_header.rows,
        reference_header.columns,
    )
    _, expected = decode_frames(find_test_file(reference))
    _, actual = decode_frames(twin_path)
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
    assert difference.max() <= near


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [
        pytest.param(
            "JPEGLSNearLossless_16.dcm", (1, 50, 10), np.uint16, id="jpeg_ls_16bit"
        ),
        pytest.param(
            "JPEGLSNearLossless_08.dcm", (1, 45, 10), np.uint8, id="jpeg_ls_8bit"
        ),
    ],
)
def test_near_lossless_mono_decodes(
    tmp_path: Path, name: str, shape: tuple[int, ...], dtype: type
) -> None:
    # The corpus has no uncompressed original of these files, so only the decode
    # itself is checked.
    _, frames = decode_frames(_copy_with_uids(name, tmp_path))
    assert frames.shape == shape
    assert frames.dtype == dtype


def test_deflated_corpus_file_decodes() -> None:
    header = read_header(find_test_file("image_dfl.dcm"))
    _, frames = decode_frames(find_test_file("image_dfl.dcm"))
    assert header.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert frames.shape == (1, 512, 512)


def test_deflated_twin_exact(tmp_path: Path) -> None:
    # pydicom's writer deflates the dataset when the file meta has this syntax.
    ds = pydicom.dcmread(find_test_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "MR_small_deflated.dcm"
    ds.save_as(path)
    _, expected = decode_frames(find_test_file("MR_small.dcm"))
    _, actual = decode_frames(path)
    assert read_header(path).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    assert np.array_equal(actual, expected)


def test_deflated_cut_truncated(tmp_path: Path) -> None:
    ds = pydicom.dcmread(find_test_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "MR_small_deflated.dcm"
    ds.save_as(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _reason(decode_frames, path) == reasons.TRUNCATED


def test_jpeg_extended_12bit_decodes() -> None:
    # pylibjpeg-libjpeg decodes 12-bit JPEG Extended, but GDCM and Pillow do not.
    _, frames = decode_frames(find_test_file("JPGExtended.dcm"))
    assert frames.shape == (1, 1024, 256)


def test_jpeg_lossless_8bit_decodes() -> None:
    _, frames = decode_frames(find_test_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert frames.shape == (1, 768, 1024)


def test_without_meta_decodes_lenient() -> None:
    _, frames = decode_frames(find_test_file("OT-PAL-8-face.dcm"))
    assert frames.shape == (1, 480, 640)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("MR_truncated.dcm", reasons.TRUNCATED, id="pixel_data_cut"),
        pytest.param("rtplan_truncated.dcm", reasons.TRUNCATED, id="sequence_cut"),
        pytest.param(
            "emri_small_jpeg_2k_lossless_too_short.dcm",
            reasons.TRUNCATED,
            id="no_sequence_delimiter",
        ),
        # libjpeg supports 12-bit JPEG Extended but rejects this stream ("A
        # misplaced marker segment was found"). GDCM and Pillow do not support it.
        pytest.param("JPEG-lossy.dcm", reasons.DECODE_FAILED, id="jpeg_12bit_corrupt"),
        pytest.param(
            "JPEG2000-embedded-sequence-delimiter.dcm",
            reasons.DECODE_FAILED,
            id="j2k_corrupt",
        ),
        pytest.param("rtplan.dcm", reasons.NON_IMAGE_OBJECT, id="rtplan"),
    ],
)
def test_decode_reason(name: str, reason: str) -> None:
    assert _reason(decode_frames, find_test_file(name)) == reason


def test_header_accepts_short_j2k_stream() -> None:
    # The header is complete. The file ends inside the encapsulated pixel data,
    # which only decode_frames reads.
    header = read_header(find_test_file("emri_small_jpeg_2k_lossless_too_short.dcm"))
    assert header.number_of_frames == 10


def test_decode_failed_message_lists_plugins() -> None:
    message = _message(decode_frames, find_test_file("JPEG-lossy.dcm"))
    assert "JPEG Extended" in message
    assert "pylibjpeg:" in message
    assert "gdcm:" in message


def test_private_syntax_unsupported(tmp_path: Path) -> None:
    # A vendor-private transfer syntax for which pydicom has no decoder.
    ds = pydicom.dcmread(find_test_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.826.0.1.3680043.8.498.1.2.4.999")
    path = tmp_path / "private_syntax.dcm"
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True)
    assert _reason(decode_frames, path) == reasons.UNSUPPORTED_TRANSFER_SYNTAX


def test_native_too_short_truncated(tmp_path: Path) -> None:
    # The element is intact, but Rows claims more pixels than it contains.
    ds = pydicom.dcmread(find_test_file("MR_small.dcm"))
    ds.Rows = ds.Rows + 1
    path = tmp_path / "rows_too_large.dcm"
    ds.save_as(path)
    assert _reason(decode_frames, path) == reasons.TRUNCATED


# File names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("image.dcm", True),
        ("IMAGE.DCM", True),
        ("image.dicom", True),
        ("image.dic", True),
        ("IM000001", True),
        ("DICOMDIR", True),
        ("1.2.840.113619.2.55.3.1", True),
        ("notes.txt", False),
        ("scan.dcm.gz", False),
        ("photo.jpg", False),
    ],
)
def test_dicom_suffix(name: str, expected: bool) -> None:
    assert is_dicom_suffix(Path("/data/study") / name) is expected


# Acceptance


def test_accepts_monochrome() -> None:
    header = read_header(find_test_file("CT_small.dcm"))
    assert check_acceptance(header, MONOCHROME_ONLY) is None


def test_rejects_rgb() -> None:
    header = read_header(find_test_file("SC_rgb.dcm"))
    (reason, _) = check_acceptance(header, MONOCHROME_ONLY)
    assert reason == reasons.IMAGE_TYPE_NOT_ACCEPTED


def test_rejects_palette_colour() -> None:
    header = read_header(find_test_file("OBXXXX1A.dcm"))
    (reason, _) = check_acceptance(header, MONOCHROME_ONLY)
    assert reason == reasons.IMAGE_TYPE_NOT_ACCEPTED


def test_rejects_colour_by_default() -> None:
    header = read_header(find_test_file("SC_rgb.dcm"))
    (reason, _) = check_acceptance(header, {"modalities": ["*"]})
    assert reason == reasons.IMAGE_TYPE_NOT_ACCEPTED


def test_rejects_modality() -> None:
    header = read_header(find_test_file("CT_small.dcm"))
    (reason, _) = check_acceptance(header, {**MONOCHROME_ONLY, "modalities": ["CR"]})
    assert reason == reasons.MODALITY_NOT_ACCEPTED


def test_accepts_listed_modality() -> None:
    header = read_header(find_test_file("dicomdirtests/77654033/CR1/6154"))
    accepts = {**MONOCHROME_ONLY, "modalities": ["CR", "DX"]}
    assert check_acceptance(header, accepts) is None


def test_modality_case_insensitive() -> None:
    header = read_header(find_test_file("CT_small.dcm"))
    assert check_acceptance(header, {**MONOCHROME_ONLY, "modalities": ["ct"]}) is None


def test_rejects_missing_modality(tmp_path: Path) -> None:
    header = read_header(_copy_with_uids("JPEGLSNearLossless_16.dcm", tmp_path))
    (reason, message) = check_acceptance(
        header, {**MONOCHROME_ONLY, "modalities": ["CT"]}
    )
    assert reason == reasons.MODALITY_NOT_ACCEPTED
    assert "no Modality" in message


def test_rejection_message_names_values() -> None:
    path = find_test_file("SC_rgb.dcm")
    (_, message) = check_acceptance(read_header(path), MONOCHROME_ONLY)
    assert str(path) in message
    assert "PhotometricInterpretation 'RGB'" in message
    assert "SamplesPerPixel 3" in message


def test_unknown_accepts_key() -> None:
    header = read_header(find_test_file("CT_small.dcm"))
    with pytest.raises(ModelSpecError):
        check_acceptance(header, {"modality": ["CT"]})
