"""Read DICOM headers and pixel data with pydicom and map failures to reason codes."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from clinfer.workers import reasons
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.misc import is_dicom
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import BaseTag
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MediaStorageDirectoryStorage,
)

from clinfer.errors import DicomInputError, ModelSpecError
from clinfer.privacy import short_hash

logger = logging.getLogger(__name__)

StrPath = str | PathLike[str]

PIXEL_DATA_TAG = 0x7FE00010
FLOAT_PIXEL_DATA_TAG = 0x7FE00008
DOUBLE_FLOAT_PIXEL_DATA_TAG = 0x7FE00009
PIXEL_TAGS = frozenset(
    {PIXEL_DATA_TAG, FLOAT_PIXEL_DATA_TAG, DOUBLE_FLOAT_PIXEL_DATA_TAG}
)

UNDEFINED_LENGTH = 0xFFFFFFFF
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Attributes read into InstanceHeader whose values must not reach messages or logs.
PHI_KEYWORDS = frozenset({"PatientID", "AccessionNumber"})

# Decoder plugin tried first per transfer syntax, where ``clinfer bench decode``
# measured it faster than pydicom's default order (GDCM first) on the same frames
# with equal output. For 12-bit JPEG Extended GDCM fails and pylibjpeg succeeds.
# When the preferred plugin is missing or fails, every plugin is tried in
# pydicom's order.
PREFERRED_PLUGINS: dict[str, str] = {
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEGExtended12Bit: "pylibjpeg",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}

DEFAULT_ACCEPTS: dict[str, list[Any]] = {
    "modalities": ["*"],
    "photometric_interpretations": list(MONOCHROME),
    "samples_per_pixel": [1],
}

# File encoding as pydicom reports it in Dataset.original_encoding
# (implicit VR, little endian), mapped to the native transfer syntax it implies.
_ENCODING_TO_SYNTAX = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


@dataclass(frozen=True)
class InstanceHeader:
    """Attributes of one DICOM instance, read without decoding its pixel data.

    String attributes that the file lacks are ``""``. ``patient_id`` and
    ``accession_number`` are for joining EMR rows only: they are left out of
    ``repr()`` so that logging a header does not log them.
    """

    path: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    photometric_interpretation: str
    samples_per_pixel: int
    number_of_frames: int
    rows: int
    columns: int
    bits_stored: int
    transfer_syntax_uid: str
    patient_id: str = field(repr=False)
    accession_number: str = field(repr=False)
    manufacturer: str
    body_part_examined: str
    view_position: str


class _ElementRecorder:
    """``stop_when`` callback for ``read_partial`` that records top-level elements.

    pydicom calls it with the tag, VR and declared length of each top-level element,
    with the file positioned at the start of the element's value.
    """

    def __init__(self, fileobj: BinaryIO, *, stop_at_pixels: bool) -> None:
        self._fileobj = fileobj
        self._stop_at_pixels = stop_at_pixels
        self.tags: set[int] = set()
        self.last_tag: int | None = None
        self.last_length: int | None = None
        self.pixel_tag: int | None = None
        self.pixel_length: int | None = None
        self.pixel_value_offset: int | None = None
        self.stopped = False

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        self.tags.add(int(tag))
        self.last_tag = int(tag)
        self.last_length = length
        if int(tag) in PIXEL_TAGS and self.pixel_tag is None:
            self.pixel_tag = int(tag)
            self.pixel_length = length
            self.pixel_value_offset = self._fileobj.tell()
            self.stopped = self._stop_at_pixels
            return self.stopped
        return False


@dataclass
class _ReadResult:
    path: str
    dataset: FileDataset
    pixel_tag: int
    pixel_length: int
    transfer_syntax_uid: UID


def is_dicom_suffix(path: StrPath) -> bool:
    """Return whether a file name looks like a DICOM file.

    Parameters
    ----------
    path : str or os.PathLike
        The file path. Only its name is inspected.

    Returns
    -------
    bool
        True for the suffixes ``.dcm``, ``.dicom`` and ``.dic`` in any case, for a
        name without a suffix (``IM000001``, ``DICOMDIR``), and for a name whose
        last dot-separated part is all digits, as in files named by their
        SOPInstanceUID (``1.2.840.113619.2.55.3.1``).
    """
    suffix = Path(path).suffix
    if not suffix:
        return True
    return suffix.lower() in DICOM_SUFFIXES or suffix[1:].isdigit()


def read_header(path: StrPath, *, strict: bool = False) -> InstanceHeader:
    """Read the header of a DICOM file and stop before its pixel data.

    The file is parsed with ``pydicom.filereader.read_partial`` up to the first
    top-level PixelData, FloatPixelData or DoubleFloatPixelData element, whose
    presence and declared length are recorded without reading its value.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    strict : bool, optional
        If True, reject files without the 128-byte preamble and ``DICM`` prefix.
        If False (the default), read them with ``force=True`` and accept them when
        the result has a SOPInstanceUID. A file without TransferSyntaxUID in its
        file meta information is then assumed to use the native transfer syntax
        that pydicom detected while parsing it.

    Returns
    -------
    InstanceHeader
        The instance's identifiers and image attributes.

    Raises
    ------
    DicomInputError
        With one of these ``reason`` values:

        - EMPTY_FILE: the file has 0 bytes.
        - DICOMDIR: the file is named DICOMDIR or has the Media Storage Directory
          SOP Class.
        - NOT_DICOM: strict mode and no preamble, or lenient mode and a forced
          read without SOPInstanceUID.
        - TRUNCATED: an element, the pixel data element included, extends past
          the end of the file, or the file ends before a sequence delimiter.
        - INVALID_DICOM: a parse error, an Image Pixel module attribute that is
          missing or not an integer, or no TransferSyntaxUID where none can be
          inferred.
        - MISSING_UID: no StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID.
        - NO_PIXEL_DATA: an image SOP class without a top-level pixel data element.
        - NON_IMAGE_OBJECT: a SOP class that is not an image (SR, RT plan,
          waveform, ...) and has no pixel data.
    OSError
        If the file cannot be opened, for example because it does not exist.
    """
    result = _read(Path(path), strict=strict, stop_at_pixels=True)
    header = _build_header(result)
    logger.debug(
        "Read header of file %s: %s, %d frame(s) of %dx%d",
        short_hash(header.path),
        result.transfer_syntax_uid.name,
        header.number_of_frames,
        header.rows,
        header.columns,
    )
    return header


def decode_frames(
    path: StrPath, *, strict: bool = False
) -> tuple[pydicom.Dataset, np.ndarray]:
    """Read a DICOM file and decode all frames of its pixel data.

    Compressed pixel data are decoded by pydicom's decoder plugins (pylibjpeg,
    GDCM, Pillow or pydicom's own RLE decoder, whichever is installed and supports
    the transfer syntax).

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    strict : bool, optional
        Whether to reject files without the DICOM preamble, as in
        :func:`read_header`.

    Returns
    -------
    pydicom.Dataset
        The full dataset. In lenient mode a missing file meta TransferSyntaxUID is
        set to the inferred native transfer syntax.
    numpy.ndarray
        Stored values in native byte order, with shape (frames, rows, columns) for
        single-channel data and (frames, rows, columns, samples) otherwise. YBR
        colour data are converted to RGB.

    Raises
    ------
    DicomInputError
        With a reason of :func:`read_header` or one of these:

        - TRUNCATED: native pixel data are shorter than Rows, Columns,
          SamplesPerPixel, BitsAllocated and NumberOfFrames require, or a
          compressed stream ends before its sequence delimiter.
        - UNSUPPORTED_TRANSFER_SYNTAX: pydicom has no decoder for the transfer
          syntax, no plugin for it is installed, or every installed plugin
          reports that it does not support this kind of data.
        - DECODE_FAILED: at least one installed plugin tried and failed. The
          message lists each plugin's error.
    OSError
        If the file cannot be opened.
    """
    result = _read(Path(path), strict=strict, stop_at_pixels=False)
    header = _build_header(result)
    ds = result.dataset
    syntax = result.transfer_syntax_uid

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomInputError(
            reasons.UNSUPPORTED_TRANSFER_SYNTAX,
            f"{header.path} has TransferSyntaxUID {_label(syntax)}, for "
            f"which pydicom {pydicom.__version__} has no pixel data decoder. Ask "
            "the sender or PACS to transcode the study to a standard transfer "
            "syntax such as Explicit VR Little Endian.",
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "none registered"
        raise DicomInputError(
            reasons.UNSUPPORTED_TRANSFER_SYNTAX,
            f"{header.path} has TransferSyntaxUID {_label(syntax)}, and no "
            f"installed plugin can decode it (plugins and their missing packages: "
            f"{missing}). Install a decoder that supports {syntax.name}.",
        )

    if not syntax.is_encapsulated:
        _check_native_length(result, header)

    try:
        frames = _pixel_array(ds, syntax, decoder.available_plugins)
    except RuntimeError as exc:
        raise _plugin_error(header, syntax, exc, decoder.available_plugins) from exc
    except Exception as exc:
        # pydicom validates the Image Pixel module before decoding and raises
        # ValueError, AttributeError or NotImplementedError for what it rejects.
        raise _decode_error(header, syntax, exc) from exc

    if header.samples_per_pixel == 1 and frames.ndim == 2:
        frames = frames[np.newaxis]
    elif header.samples_per_pixel > 1 and frames.ndim == 3:
        frames = frames[np.newaxis]
    if not frames.dtype.isnative:
        frames = frames.astype(frames.dtype.newbyteorder("="))
    logger.debug(
        "Decoded file %s: %s, frames %s",
        short_hash(header.path),
        syntax.name,
        tuple(frames.shape),
    )
    return ds, frames


def _pixel_array(ds: Dataset, syntax: UID, plugins: Sequence[str]) -> np.ndarray:
    """Decode with the preferred plugin of ``syntax``, else with every plugin."""
    plugin = PREFERRED_PLUGINS.get(syntax)
    if plugin in plugins:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except Exception as exc:  # noqa: BLE001 - the other plugins get their turn
            logger.debug("plugin %s failed on %s: %s", plugin, syntax.name, exc)
    return pixel_array(ds)


def check_acceptance(
    header: InstanceHeader, accepts: Mapping[str, Sequence[Any]]
) -> tuple[str, str] | None:
    """Check an instance against the image types that a model accepts.

    Parameters
    ----------
    header : InstanceHeader
        The instance, as returned by :func:`read_header`.
    accepts : Mapping
        The model's accepted values, with the keys ``"modalities"`` (Modality
        values, or ``["*"]`` for any), ``"photometric_interpretations"`` and
        ``"samples_per_pixel"``. A missing key takes its value from
        ``DEFAULT_ACCEPTS``: any modality, MONOCHROME1 or MONOCHROME2, and one
        sample per pixel. PALETTE COLOR and SamplesPerPixel > 1 therefore need to
        be listed explicitly to be accepted.

    Returns
    -------
    tuple[str, str] or None
        None when the instance is accepted, otherwise ``(reason, message)`` with
        reason MODALITY_NOT_ACCEPTED or IMAGE_TYPE_NOT_ACCEPTED.

    Raises
    ------
    ModelSpecError
        If ``accepts`` has a key other than the three above.
    """
    unknown = sorted(set(accepts) - set(DEFAULT_ACCEPTS))
    if unknown:
        raise ModelSpecError(
            f"The model spec's accepts has unknown keys {unknown}. The known keys "
            f"are {sorted(DEFAULT_ACCEPTS)}. Fix the spec stored with the model."
        )
    rules = {**DEFAULT_ACCEPTS, **accepts}

    modalities = [str(value).upper() for value in rules["modalities"]]
    if "*" not in modalities and header.modality.upper() not in modalities:
        found = f"Modality {header.modality!r}" if header.modality else "no Modality"
        return (
            reasons.MODALITY_NOT_ACCEPTED,
            f"{header.path} has {found}, and this model accepts only Modality "
            f"{modalities}. Send the study to a model for its modality.",
        )

    interpretations = [str(value) for value in rules["photometric_interpretations"]]
    samples = [int(value) for value in rules["samples_per_pixel"]]
    if (
        header.photometric_interpretation not in interpretations
        or header.samples_per_pixel not in samples
    ):
        return (
            reasons.IMAGE_TYPE_NOT_ACCEPTED,
            f"{header.path} has PhotometricInterpretation "
            f"{header.photometric_interpretation!r} and SamplesPerPixel "
            f"{header.samples_per_pixel}, and this model accepts only "
            f"PhotometricInterpretation {interpretations} with SamplesPerPixel "
            f"{samples}. Send colour images to a model that accepts them.",
        )
    return None


def _read(path: Path, *, strict: bool, stop_at_pixels: bool) -> _ReadResult:
    """Parse a file and run every check that does not need the pixel values."""
    name = str(path)
    size = path.stat().st_size
    if size == 0:
        raise DicomInputError(
            reasons.EMPTY_FILE,
            f"{name} is empty (0 bytes). The copy from PACS or storage was probably "
            "interrupted. Copy or export the file again.",
        )
    if path.name.upper() == "DICOMDIR":
        raise _dicomdir_error(name)

    has_preamble = is_dicom(path)
    if strict and not has_preamble:
        raise DicomInputError(
            reasons.NOT_DICOM,
            f"{name} does not start with the 128-byte DICOM preamble and 'DICM' "
            "prefix, which strict mode requires. Re-export the study from PACS as "
            "DICOM Part 10 files, or read it in lenient mode.",
        )

    with path.open("rb") as fileobj:
        recorder = _ElementRecorder(fileobj, stop_at_pixels=stop_at_pixels)
        try:
            ds = read_partial(fileobj, stop_when=recorder, force=not strict)
        except zlib.error as exc:
            # CPython's zlib reports a stream that ends early as "incomplete or
            # truncated stream" (Z_BUF_ERROR).
            reason = reasons.INVALID_DICOM
            if "truncated" in str(exc):
                reason = reasons.TRUNCATED
            deflated = _label(DeflatedExplicitVRLittleEndian)
            raise DicomInputError(
                reason,
                f"{name} has TransferSyntaxUID {deflated}, and inflating its "
                f"dataset failed ({exc}). Copy or re-export the file from PACS.",
            ) from exc
        except Exception as exc:
            # pydicom raises InvalidDicomError, OSError, EOFError, struct.error or
            # ValueError for files it cannot parse.
            raise _parse_error(name, has_preamble, exc) from exc

    meta = ds.file_meta if ds.file_meta is not None else FileMetaDataset()
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    if sop_class == MediaStorageDirectoryStorage:
        raise _dicomdir_error(name)
    if not has_preamble and not ds.get("SOPInstanceUID"):
        raise DicomInputError(
            reasons.NOT_DICOM,
            f"{name} has no DICOM preamble, and reading it anyway gave no "
            "SOPInstanceUID, so it is not a DICOM dataset. Remove it from the input "
            "or find out what wrote it.",
        )

    syntax = meta.get("TransferSyntaxUID")
    _check_complete(
        name, ds, recorder, size, deflated=syntax == DeflatedExplicitVRLittleEndian
    )
    _check_uids(name, ds)

    pixel_tag = recorder.pixel_tag
    if pixel_tag is None:
        sop_name = UID(str(sop_class)).name if sop_class else "no SOPClassUID"
        if sop_class and "Image Storage" not in sop_name:
            # Structured reports, RT plans, waveforms and other non-image objects
            # belong in a study folder and carry no pixels by definition.
            raise DicomInputError(
                reasons.NON_IMAGE_OBJECT,
                f"{name} is a {sop_name} object, not an image; it was skipped.",
            )
        raise DicomInputError(
            reasons.NO_PIXEL_DATA,
            f"{name} ({sop_name}) has no PixelData, FloatPixelData or "
            "DoubleFloatPixelData element, so it contains no image to score. "
            "Re-export the image from PACS with its pixel data.",
        )
    pixel_length = recorder.pixel_length if recorder.pixel_length is not None else 0

    if not syntax:
        syntax = _infer_syntax(name, ds, strict=strict, pixel_length=pixel_length)
        ds.file_meta = meta
        ds.file_meta.TransferSyntaxUID = syntax

    return _ReadResult(
        path=name,
        dataset=ds,
        pixel_tag=pixel_tag,
        pixel_length=pixel_length,
        transfer_syntax_uid=UID(str(syntax)),
    )


def _check_complete(
    name: str, ds: Dataset, recorder: _ElementRecorder, size: int, *, deflated: bool
) -> None:
    """Raise TRUNCATED or INVALID_DICOM if parsing ended early or data are missing."""
    lost = recorder.tags - {int(tag) for tag in ds.keys()}
    if recorder.stopped and recorder.pixel_tag is not None:
        lost.discard(recorder.pixel_tag)
    if lost:
        # pydicom builds the element dict in one expression, so an error in one
        # element drops them all. If the last element seen has undefined length,
        # the search for its delimiter ran into the end of the file.
        keyword = _keyword(recorder.last_tag)
        if recorder.last_length == UNDEFINED_LENGTH:
            raise DicomInputError(
                reasons.TRUNCATED,
                f"{name} is truncated: the file ends inside the undefined-length "
                f"{keyword} element, before its sequence delimiter. Copy or "
                "re-export the file from PACS.",
            )
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} could not be parsed: pydicom stopped at the {keyword} "
            "element and returned no elements. Re-export the study from PACS.",
        )

    if deflated:
        # Element offsets refer to the inflated stream, not to the file on disk.
        return
    for tag in ds.keys():
        element = ds.get_item(tag)
        if not isinstance(element, RawDataElement):
            continue
        if element.length == UNDEFINED_LENGTH:
            continue
        end = element.value_tell + element.length
        if end > size:
            raise _truncated_error(name, int(tag), element.length, end - size)
    if (
        recorder.pixel_tag is not None
        and recorder.pixel_value_offset is not None
        and recorder.pixel_length is not None
        and recorder.pixel_length != UNDEFINED_LENGTH
    ):
        end = recorder.pixel_value_offset + recorder.pixel_length
        if end > size:
            raise _truncated_error(
                name, recorder.pixel_tag, recorder.pixel_length, end - size
            )


def _check_uids(name: str, ds: Dataset) -> None:
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    missing = [keyword for keyword in keywords if not _string(name, ds, keyword)]
    if missing:
        raise DicomInputError(
            reasons.MISSING_UID,
            f"{name} has no {', '.join(missing)}, which identify the instance. "
            "Re-export the study from PACS, or add the UIDs with a DICOM editor.",
        )


def _infer_syntax(name: str, ds: Dataset, *, strict: bool, pixel_length: int) -> UID:
    """Return the native transfer syntax of a file whose meta lacks one."""
    if strict:
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} has no TransferSyntaxUID in its file meta information, which "
            "strict mode requires. Re-export the study from PACS, or read it in "
            "lenient mode.",
        )
    if pixel_length == UNDEFINED_LENGTH:
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} has no TransferSyntaxUID, and its pixel data are encapsulated "
            "(compressed), so the codec cannot be determined. Re-export the study "
            "from PACS.",
        )
    syntax = _ENCODING_TO_SYNTAX.get(tuple(ds.original_encoding))
    if syntax is None:
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} has no TransferSyntaxUID, and pydicom could not determine its "
            f"encoding (implicit VR, little endian = {ds.original_encoding}). "
            "Re-export the study from PACS.",
        )
    logger.debug(
        "file %s has no TransferSyntaxUID, reading it as %s",
        short_hash(name),
        syntax.name,
    )
    return syntax


def _build_header(result: _ReadResult) -> InstanceHeader:
    name = result.path
    ds = result.dataset
    is_integer_data = result.pixel_tag == PIXEL_DATA_TAG

    bits_allocated = _integer(name, ds, "BitsAllocated")
    if is_integer_data:
        bits_stored = _integer(name, ds, "BitsStored")
        _integer(name, ds, "PixelRepresentation")
    else:
        # The Floating Point Image Pixel module has no BitsStored.
        bits_stored = bits_allocated
    number_of_frames = _integer(name, ds, "NumberOfFrames", default=1)
    if number_of_frames < 1:
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} has NumberOfFrames {number_of_frames}, which must be at least "
            "1. Fix the attribute with a DICOM editor or re-export the study.",
        )
    photometric = _string(name, ds, "PhotometricInterpretation")
    if not photometric:
        raise _missing_attribute_error(name, "PhotometricInterpretation")

    meta = ds.file_meta
    sop_class = _string(name, ds, "SOPClassUID") or str(
        meta.get("MediaStorageSOPClassUID", "")
    )
    return InstanceHeader(
        path=name,
        study_instance_uid=_string(name, ds, "StudyInstanceUID"),
        series_instance_uid=_string(name, ds, "SeriesInstanceUID"),
        sop_instance_uid=_string(name, ds, "SOPInstanceUID"),
        sop_class_uid=sop_class,
        modality=_string(name, ds, "Modality"),
        photometric_interpretation=photometric,
        samples_per_pixel=_integer(name, ds, "SamplesPerPixel"),
        number_of_frames=number_of_frames,
        rows=_integer(name, ds, "Rows"),
        columns=_integer(name, ds, "Columns"),
        bits_stored=bits_stored,
        transfer_syntax_uid=str(result.transfer_syntax_uid),
        patient_id=_string(name, ds, "PatientID"),
        accession_number=_string(name, ds, "AccessionNumber"),
        manufacturer=_string(name, ds, "Manufacturer"),
        body_part_examined=_string(name, ds, "BodyPartExamined"),
        view_position=_string(name, ds, "ViewPosition"),
    )


def _value(name: str, ds: Dataset, keyword: str) -> Any:
    """Return an attribute's value, converting pydicom's parse errors."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        # pydicom converts raw values on first access and can raise ValueError,
        # struct.error, UnicodeDecodeError or others for malformed values.
        detail = f" ({type(exc).__name__}: {exc})"
        if keyword in PHI_KEYWORDS:
            # The error text may quote the value.
            detail = f" ({type(exc).__name__})"
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} has a {keyword} value that pydicom cannot parse{detail}. Fix "
            "the attribute with a DICOM editor or re-export the study from PACS.",
        ) from exc


def _string(name: str, ds: Dataset, keyword: str) -> str:
    value = _value(name, ds, keyword)
    return "" if value is None else str(value).strip()


def _integer(
    name: str, ds: Dataset, keyword: str, *, default: int | None = None
) -> int:
    value = _value(name, ds, keyword)
    if value is None or value == "":
        if default is not None:
            return default
        raise _missing_attribute_error(name, keyword)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DicomInputError(
            reasons.INVALID_DICOM,
            f"{name} has {keyword} {value!r}, which is not an integer. Fix the "
            "attribute with a DICOM editor or re-export the study from PACS.",
        ) from exc


def _check_native_length(result: _ReadResult, header: InstanceHeader) -> None:
    """Raise TRUNCATED if native pixel data are shorter than the image needs."""
    ds = result.dataset
    expected = get_expected_length(ds, unit="bytes")
    actual = len(ds[result.pixel_tag].value)
    if actual < expected:
        keyword = _keyword(result.pixel_tag)
        raise DicomInputError(
            reasons.TRUNCATED,
            f"{header.path} has {actual} bytes of {keyword}, but Rows {header.rows}, "
            f"Columns {header.columns}, SamplesPerPixel {header.samples_per_pixel}, "
            f"BitsAllocated {ds.BitsAllocated} and NumberOfFrames "
            f"{header.number_of_frames} need {expected}. The file is truncated or "
            "those attributes are wrong. Re-export the study from PACS.",
        )


def _plugin_error(
    header: InstanceHeader, syntax: UID, exc: RuntimeError, plugins: Sequence[str]
) -> DicomInputError:
    """Build the error for pixel data that every decoder plugin failed to decode.

    pydicom 3.0.2 raises one RuntimeError with a line ``<plugin>: <error>`` per
    plugin. Its GDCM and Pillow plugins reject data they cannot handle (such as
    12-bit JPEG Extended) with "... does not support ...", so the reason is
    UNSUPPORTED_TRANSFER_SYNTAX only when every plugin's error contains that.

    NOTE: no test reaches the UNSUPPORTED_TRANSFER_SYNTAX branch, because with the
    plugins in pyproject.toml pylibjpeg-libjpeg accepts 12-bit JPEG Extended.
    """
    errors = _plugin_messages(str(exc), plugins)
    details = "; ".join(f"{plugin}: {error}" for plugin, error in errors.items())
    if errors and all("does not support" in error for error in errors.values()):
        return DicomInputError(
            reasons.UNSUPPORTED_TRANSFER_SYNTAX,
            f"No installed plugin supports the pixel data of {header.path} "
            f"(TransferSyntaxUID {_label(syntax)}, BitsStored "
            f"{header.bits_stored}): {details}. Install a decoder that supports "
            f"{syntax.name} with {header.bits_stored}-bit samples, such as "
            "pylibjpeg-libjpeg for JPEG.",
        )
    return DicomInputError(
        reasons.DECODE_FAILED,
        f"Every installed plugin failed to decode the pixel data of {header.path} "
        f"(TransferSyntaxUID {_label(syntax)}): {details or exc}. The "
        "compressed stream is probably corrupt. Re-export the study from PACS.",
    )


def _plugin_messages(text: str, plugins: Sequence[str]) -> dict[str, str]:
    """Split pydicom's all-plugins-failed message into one error per plugin."""
    messages: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        plugin, separator, error = stripped.partition(": ")
        if separator and plugin in plugins:
            current = plugin
            messages[plugin] = error
        elif current is not None and stripped:
            messages[current] += " " + stripped
    return messages


def _decode_error(
    header: InstanceHeader, syntax: UID, exc: Exception
) -> DicomInputError:
    return DicomInputError(
        reasons.DECODE_FAILED,
        f"Decoding the pixel data of {header.path} (TransferSyntaxUID "
        f"{_label(syntax)}) failed with {type(exc).__name__}: {exc}. Check the Image "
        "Pixel module attributes (Rows, Columns, BitsAllocated, BitsStored, "
        "PhotometricInterpretation) or re-export the study from PACS.",
    )


def _parse_error(name: str, has_preamble: bool, exc: Exception) -> DicomInputError:
    if isinstance(exc, InvalidDicomError) and not has_preamble:
        return DicomInputError(
            reasons.NOT_DICOM,
            f"{name} is not a DICOM file ({exc}). Remove it from the input.",
        )
    if isinstance(exc, EOFError):
        return DicomInputError(
            reasons.TRUNCATED,
            f"{name} is truncated: pydicom reached the end of the file while "
            f"reading its header ({exc}). Copy or re-export the file from PACS.",
        )
    if not has_preamble:
        return DicomInputError(
            reasons.NOT_DICOM,
            f"{name} has no DICOM preamble, and reading it anyway failed with "
            f"{type(exc).__name__}: {exc}. Remove it from the input or find out "
            "what wrote it.",
        )
    return DicomInputError(
        reasons.INVALID_DICOM,
        f"{name} could not be parsed as DICOM ({type(exc).__name__}: {exc}). "
        "Re-export the study from PACS.",
    )


def _dicomdir_error(name: str) -> DicomInputError:
    return DicomInputError(
        reasons.DICOMDIR,
        f"{name} is a DICOMDIR (Media Storage Directory, SOPClassUID "
        f"{MediaStorageDirectoryStorage}), an index of the files on a medium and "
        "not an image. The images it lists are read as separate files.",
    )


def _truncated_error(name: str, tag: int, length: int, missing: int) -> DicomInputError:
    return DicomInputError(
        reasons.TRUNCATED,
        f"{name} is truncated: the {_keyword(tag)} element declares {length} bytes, "
        f"but the file ends {missing} bytes short of the element's end. Copy or "
        "re-export the file from PACS.",
    )


def _missing_attribute_error(name: str, keyword: str) -> DicomInputError:
    return DicomInputError(
        reasons.INVALID_DICOM,
        f"{name} has pixel data but no {keyword} value, so the Image Pixel module "
        "is incomplete. Re-export the study from PACS.",
    )


def _label(syntax: UID) -> str:
    """Return a transfer syntax UID followed by its name, if pydicom has one."""
    if syntax.name == str(syntax):
        return str(syntax)
    return f"{syntax} ({syntax.name})"


def _keyword(tag: int | None) -> str:
    if tag is None:
        return "first"
    return keyword_for_tag(tag) or str(BaseTag(tag))
