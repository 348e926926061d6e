"""Decode throughput per transfer syntax: clinfer's decode path against each decoder."""

from __future__ import annotations

import io
import logging
import math
import statistics
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from clinfer.bench.schema import BenchResult, Plot, Ratio, Series, machine_info
from clinfer.workers import reasons
from clinfer.workers.dicom_io import decode_frames, read_header
from clinfer.workers.stages import DecodeStage
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from clinfer.corpus import find_test_file
from clinfer.errors import ClinferError, ConfigurationError, DicomInputError

logger = logging.getLogger(__name__)

MB = 1_000_000
MAX_LOOPS = 10_000

# Corpus files per transfer syntax (pydicom 3.0.2 test files and pydicom-data
# 1.0.0), small files first. A run takes the first ``files_per_syntax`` of them that
# clinfer's decode path reads, and lists the others it tried as unsupported.
# Monochrome files come first because the workers preprocess only those; the JPEG
# Baseline files of the corpus are all colour.
SYNTAX_FILES: dict[UID, tuple[str, ...]] = {
    ExplicitVRLittleEndian: (
        "MR_small.dcm",
        "CT_small.dcm",
        "693_UNCR.dcm",
        "MR2_UNCR.dcm",
        "RG3_UNCR.dcm",
    ),
    ImplicitVRLittleEndian: ("MR_small_implicit.dcm", "rtdose.dcm"),
    ExplicitVRBigEndian: ("MR_small_bigendian.dcm", "emri_small_big_endian.dcm"),
    DeflatedExplicitVRLittleEndian: ("image_dfl.dcm",),
    RLELossless: ("MR_small_RLE.dcm", "emri_small_RLE.dcm", "rtdose_rle.dcm"),
    JPEGBaseline8Bit: (
        "SC_rgb_jpeg.dcm",
        "examples_ybr_color.dcm",
        "color3d_jpeg_baseline.dcm",
    ),
    # JPEG-lossy.dcm is a 12-bit stream that every installed decoder rejects.
    JPEGExtended12Bit: ("JPEG-lossy.dcm", "JPGExtended.dcm"),
    JPEGLossless: (),
    JPEGLosslessSV1: ("JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"),
    JPEGLSLossless: (
        "MR_small_jpeg_ls_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ),
    # The JPEG-LS near-lossless files lack StudyInstanceUID and SeriesInstanceUID,
    # so the benchmark measures copies with those UIDs added.
    JPEGLSNearLossless: ("JPEGLSNearLossless_16.dcm", "JPEGLSNearLossless_08.dcm"),
    JPEG2000Lossless: (
        "MR_small_jp2klossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "693_J2KR.dcm",
        "MR2_J2KR.dcm",
        "RG3_J2KR.dcm",
    ),
    JPEG2000: ("693_J2KI.dcm", "JPEG2000.dcm", "MR2_J2KI.dcm", "RG3_J2KI.dcm"),
    HTJ2KLossless: (),
    HTJ2KLosslessRPCL: (),
    HTJ2K: (),
}

NATIVE_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian}
)
JPEG_SYNTAXES = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1}
)
JPEG_LS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})
J2K_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
HTJ2K_SYNTAXES = frozenset({HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})

CLINFER_DECODE = "clinfer decode"
CLINFER_PIPELINE = "clinfer decode+preprocess"
PLUGIN_PREFIX = "pydicom:"
# Decoders that only copy or inflate bytes, so their frames must equal clinfer's.
EXACT_DECODERS = frozenset({"numpy", "zlib"})

DISTRIBUTIONS = (
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "python-gdcm",
    "pillow",
    "numpy",
)


@dataclass(frozen=True)
class DecodeConfig:
    """Sizes of one P4 run."""

    files_per_syntax: int = 3
    """Decodable corpus files measured per transfer syntax."""
    repeats: int = 5
    """Interleaved repeats of every decoder after the warm-up. Medians are compared."""
    min_pass_s: float = 0.2
    """Minimum seconds of one measurement: a pass over a syntax's files is looped
    until it lasts this long, with the loop count set in the warm-up."""
    syntaxes: tuple[str, ...] = ()
    """Transfer syntax keywords (``"JPEG2000Lossless"``) to measure; empty for all
    of :data:`SYNTAX_FILES`."""
    height: int = 224
    """Model input height of the preprocessing step, in pixels."""
    width: int = 224
    """Model input width of the preprocessing step, in pixels."""

    @classmethod
    def small(cls) -> DecodeConfig:
        """Return a configuration that runs in well under a minute on 2 cores."""
        return cls(files_per_syntax=1, repeats=3, min_pass_s=0.005)

    @property
    def command(self) -> str:
        """The ``clinfer bench decode`` command line of this configuration."""
        parts = [
            "clinfer bench decode",
            f"--files-per-syntax {self.files_per_syntax}",
            f"--repeats {self.repeats}",
            f"--min-pass-s {self.min_pass_s}",
        ]
        parts.extend(f"--syntax {keyword}" for keyword in self.syntaxes)
        return " ".join(parts)


@dataclass
class _Input:
    """One corpus file with everything the decoders need, read before timing."""

    name: str
    path: Path
    sop_instance_uid: str
    dataset: pydicom.Dataset
    encoded_frames: list[bytes]
    file_bytes: bytes
    clinfer_frames: np.ndarray
    photometric: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    number_of_frames: int
    added_uids: list[str] = field(default_factory=list)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of pixel data after decoding, all frames."""
        return int(self.clinfer_frames.nbytes)

    @property
    def monochrome(self) -> bool:
        """Whether the workers preprocess this image (MONOCHROME1/2, one sample)."""
        return self.photometric in ("MONOCHROME1", "MONOCHROME2") and self.samples == 1

    def describe(self) -> dict[str, Any]:
        """Return the file's name and image attributes for ``raw``."""
        return {
            "file": self.name,
            "path": str(self.path),
            "frames": self.number_of_frames,
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples,
            "bits_allocated": self.bits_allocated,
            "photometric_interpretation": self.photometric,
            "encoded_bytes": sum(len(frame) for frame in self.encoded_frames),
            "decoded_bytes": self.decoded_bytes,
            "uids_added_to_copy": self.added_uids,
        }


@dataclass
class _Candidate:
    """One way of decoding a syntax's files: a pass over all of them."""

    label: str
    kind: str
    run_pass: Callable[[], int]
    loops: int = 1
    samples_s: list[float] = field(default_factory=list)
    matches_clinfer: bool | None = None


def run(config: DecodeConfig, work_dir: Path) -> BenchResult:
    """Measure decode throughput per transfer syntax, clinfer against each decoder.

    For every transfer syntax of :data:`SYNTAX_FILES` the benchmark reads up to
    ``config.files_per_syntax`` corpus files and times, interleaved after a
    warm-up, passes over those files with:

    - ``clinfer decode``: :func:`clinfer.workers.dicom_io.decode_frames` on the
      file path, as the workers call it (file read, header checks, decode);
    - ``clinfer decode+preprocess``: :class:`clinfer.workers.stages.DecodeStage`
      on a batch of the paths, monochrome files only;
    - every standalone decoder installed for the syntax on the encoded frames
      already in memory: the codec libraries' own functions (``libjpeg``,
      ``openjpeg``, ``rle``, ``pyjpegls``, ``pillow``, ``numpy``, ``zlib``) and
      pydicom's decoder with each plugin (``pydicom:<plugin>``) on the parsed
      dataset.

    Parameters
    ----------
    config : DecodeConfig
        What to measure and for how long.
    work_dir : Path
        Created if missing. Corpus files are read in place, except that a file
        rejected only for a missing StudyInstanceUID or SeriesInstanceUID is
        copied here with generated UIDs and measured from the copy.

    Returns
    -------
    BenchResult
        Named ``"p4"``. It has one ratio per measured syntax (clinfer decode
        frames/s over the fastest standalone decoder), one more with
        preprocessing where that applies, and frames/s and MB/s plots per
        syntax. ``raw`` contains every median, the files used and the plugin
        that clinfer's path used. It also lists the syntaxes and files that
        could not be measured, each with the reason.

    Raises
    ------
    ConfigurationError
        If the corpus is not installed, a keyword in ``config.syntaxes`` is not
        in :data:`SYNTAX_FILES`, or no syntax could be measured at all.
    """
    # Decoders that reject a syntax are expected here; pydicom logs each rejection
    # as an ERROR with a traceback, which would bury the benchmark's own output.
    decoder_log = logging.getLogger("pydicom.pixels.decoders.base")
    level = decoder_log.level
    decoder_log.setLevel(logging.CRITICAL)
    try:
        return _run(config, work_dir)
    finally:
        decoder_log.setLevel(level)


def _run(config: DecodeConfig, work_dir: Path) -> BenchResult:
    work_dir.mkdir(parents=True, exist_ok=True)
    syntaxes = _select_syntaxes(config.syntaxes)
    stage = DecodeStage(height=config.height, width=config.width, strict=False)

    unsupported: dict[str, str] = {}
    unsupported_files: list[dict[str, str]] = []
    measured: dict[str, dict[str, Any]] = {}
    candidates: dict[str, list[_Candidate]] = {}
    inputs: dict[str, list[_Input]] = {}

    # pydicom warns about attributes it corrects while decoding. The warnings are
    # counted in the warm-up and then silenced so that they are not timed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for syntax in syntaxes:
            keyword = syntax.keyword
            files, rejected, reason = _load_inputs(
                syntax, config.files_per_syntax, work_dir
            )
            unsupported_files.extend(rejected)
            if not files:
                unsupported[keyword] = reason
                logger.info("P4 %s: not measured, %s", keyword, reason)
                continue
            record, syntax_candidates = _prepare(syntax, files, stage)
            inputs[keyword] = files
            measured[keyword] = record
            candidates[keyword] = syntax_candidates

        if not measured:
            raise ConfigurationError(
                "No transfer syntax could be measured: clinfer's decode path read "
                f"none of the corpus files ({unsupported}). Reinstall pydicom and "
                "pydicom-data and check the decoder packages in pyproject.toml."
            )

        for syntax_candidates in candidates.values():
            for candidate in syntax_candidates:
                _calibrate(candidate, config.min_pass_s)
        for repeat in range(config.repeats):
            for syntax_candidates in candidates.values():
                # Rotating the order spreads drifts in machine load over all
                # decoders instead of always hitting the same one first.
                shift = repeat % len(syntax_candidates)
                for candidate in syntax_candidates[shift:] + syntax_candidates[:shift]:
                    candidate.samples_s.append(_time_pass(candidate))

    ratios: list[Ratio] = []
    notes: list[str] = []
    for keyword, record in measured.items():
        _summarise(record, candidates[keyword])
        ratios.extend(_ratios(keyword, record, config.repeats))
        notes.append(_note(keyword, record))
        logger.info(
            "P4 %s: clinfer %.1f frames/s, fastest %s %.1f frames/s",
            keyword,
            record["clinfer_frames_per_s"],
            record["fastest"],
            record["fastest_frames_per_s"],
        )

    order = list(measured)
    return BenchResult(
        name="p4",
        title="Decode throughput per transfer syntax",
        command=config.command,
        ratios=ratios,
        plots=_plots(order, measured),
        raw={
            "machine": machine_info(),
            "config": asdict(config),
            "versions": _versions(),
            "syntax_order": order,
            "syntaxes": measured,
            "unsupported": unsupported,
            "unsupported_files": unsupported_files,
        },
        notes=notes,
    )


def _select_syntaxes(keywords: Sequence[str]) -> list[UID]:
    if not keywords:
        return list(SYNTAX_FILES)
    by_keyword = {syntax.keyword: syntax for syntax in SYNTAX_FILES}
    unknown = [keyword for keyword in keywords if keyword not in by_keyword]
    if unknown:
        raise ConfigurationError(
            f"Unknown transfer syntax keywords {unknown}. Use pydicom UID keywords "
            f"from this list: {sorted(by_keyword)}."
        )
    return [by_keyword[keyword] for keyword in keywords]


def _load_inputs(
    syntax: UID, count: int, work_dir: Path
) -> tuple[list[_Input], list[dict[str, str]], str]:
    """Read up to ``count`` files of a syntax that clinfer's decode path decodes.

    Returns the inputs, the files tried and rejected with their reason, and the
    reason to give when no file is left.
    """
    names = SYNTAX_FILES[syntax]
    if not names:
        return [], [], "no file with this transfer syntax in the corpus"
    loaded: list[_Input] = []
    rejected: list[dict[str, str]] = []
    for name in names:
        if len(loaded) == count:
            break
        path = find_test_file(name)
        added_uids: list[str] = []
        try:
            header = read_header(path)
        except DicomInputError as exc:
            if exc.reason != reasons.MISSING_UID:
                rejected.append(_rejection(syntax, name, exc))
                continue
            path, added_uids = _copy_with_uids(path, work_dir)
        try:
            header = read_header(path)
            _, frames = decode_frames(path)
        except ClinferError as exc:
            rejected.append(_rejection(syntax, name, exc))
            continue
        if header.transfer_syntax_uid != syntax:
            raise ConfigurationError(
                f"{path} has TransferSyntaxUID {header.transfer_syntax_uid}, not "
                f"{syntax} ({syntax.name}). Fix its entry in SYNTAX_FILES."
            )
        item = _read_input(name, path, header.sop_instance_uid, frames)
        item.added_uids = added_uids
        loaded.append(item)
    reason = "clinfer's decode path failed on every corpus file: " + "; ".join(
        f"{item['file']}: {item['reason']}" for item in rejected
    )
    return loaded, rejected, reason


def _rejection(syntax: UID, name: str, exc: ClinferError) -> dict[str, str]:
    return {
        "syntax": syntax.keyword,
        "file": name,
        "reason": str(getattr(exc, "reason", type(exc).__name__)),
        "message": str(exc),
    }


def _copy_with_uids(path: Path, work_dir: Path) -> tuple[Path, list[str]]:
    """Copy a corpus file into ``work_dir`` with its missing instance UIDs added.

    The UIDs are derived from the file name, so reruns write the same copy. The
    pixel data are copied unchanged.
    """
    ds = pydicom.dcmread(path)
    added = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            uid = generate_uid(entropy_srcs=[path.name, keyword])
            setattr(ds, keyword, uid)
            added.append(keyword)
    copies = work_dir / "uids_added"
    copies.mkdir(parents=True, exist_ok=True)
    target = copies / path.name
    ds.save_as(target)
    logger.info("P4 copied %s with %s added", path.name, ", ".join(added))
    return target, added


def _read_input(
    name: str, path: Path, sop_instance_uid: str, frames: np.ndarray
) -> _Input:
    file_bytes = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(file_bytes))
    syntax = ds.file_meta.TransferSyntaxUID
    count = int(ds.get("NumberOfFrames") or 1)
    pixel_data = ds.PixelData
    if syntax.is_encapsulated:
        encoded = list(generate_frames(pixel_data, number_of_frames=count))
    else:
        size = len(pixel_data) // count
        encoded = [pixel_data[i * size : (i + 1) * size] for i in range(count)]
    return _Input(
        name=name,
        path=path,
        sop_instance_uid=sop_instance_uid,
        dataset=ds,
        encoded_frames=encoded,
        file_bytes=file_bytes,
        clinfer_frames=frames,
        photometric=str(ds.PhotometricInterpretation),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples=int(ds.SamplesPerPixel),
        bits_allocated=int(ds.BitsAllocated),
        number_of_frames=count,
    )


def _prepare(
    syntax: UID, files: list[_Input], stage: DecodeStage
) -> tuple[dict[str, Any], list[_Candidate]]:
    """Build and check every candidate for one syntax; the checks are the warm-up."""
    record: dict[str, Any] = {
        "name": syntax.name,
        "uid": str(syntax),
        "files": [item.describe() for item in files],
        "frames_per_pass": sum(item.number_of_frames for item in files),
        "decoded_bytes_per_pass": sum(item.decoded_bytes for item in files),
        "clinfer_plugins": {item.name: _clinfer_plugin(item) for item in files},
        "decoder_errors": {},
        "warnings": _count_warnings(files),
    }

    def clinfer_pass() -> int:
        for item in files:
            decode_frames(item.path)
        return record["frames_per_pass"]

    candidates = [_Candidate(CLINFER_DECODE, "clinfer", clinfer_pass)]
    if all(item.monochrome for item in files):
        batch = {
            "path": np.array([str(item.path) for item in files]),
            "sop_instance_uid": np.array([item.sop_instance_uid for item in files]),
        }

        shares: list[float] = record.setdefault("preprocess_shares", [])

        def pipeline_pass() -> int:
            output = stage(batch)
            decode_ms = float(np.sum(output["decode_ms"]))
            preprocess_ms = float(np.sum(output["preprocess_ms"]))
            shares.append(preprocess_ms / (decode_ms + preprocess_ms))
            return len(output["ok"])

        output = stage(batch)
        failed = [str(message) for ok, message in zip(output["ok"], output["message"])]
        if all(output["ok"]):
            candidates.append(_Candidate(CLINFER_PIPELINE, "clinfer", pipeline_pass))
        else:
            record["decoder_errors"][CLINFER_PIPELINE] = "; ".join(failed)
    else:
        record["decoder_errors"][CLINFER_PIPELINE] = (
            "not measured: the workers preprocess only MONOCHROME1/2 images with "
            "one sample per pixel, and these files are colour"
        )

    for label, kind, decode in _standalone(syntax, files):
        try:
            matches = _check(label, decode, files)
        except Exception as exc:
            # A decoder that rejects this kind of data drops out of the comparison.
            record["decoder_errors"][label] = f"{type(exc).__name__}: {exc}"
            continue
        candidate = _Candidate(label, kind, _pass_of(decode, files))
        candidate.matches_clinfer = matches
        candidates.append(candidate)
    return record, candidates


def _pass_of(
    decode: Callable[[_Input], list[np.ndarray]], files: list[_Input]
) -> Callable[[], int]:
    def run_pass() -> int:
        frames = 0
        for item in files:
            frames += len(decode(item))
        return frames

    return run_pass


def _check(
    label: str, decode: Callable[[_Input], list[np.ndarray]], files: list[_Input]
) -> bool:
    """Decode each file once and raise ValueError if a frame has the wrong size.

    Returns whether every frame equals clinfer's decoded values. Lossy codecs
    and colour conversions need not reproduce them, so a mismatch is recorded,
    not raised, except for the decoders in :data:`EXACT_DECODERS`.
    """
    matches = True
    for item in files:
        frames = decode(item)
        if len(frames) != item.number_of_frames:
            raise ValueError(
                f"{item.name}: {len(frames)} frames decoded, "
                f"{item.number_of_frames} expected"
            )
        expected = item.rows * item.columns * item.samples
        for index, frame in enumerate(frames):
            if frame.size != expected:
                raise ValueError(
                    f"{item.name} frame {index}: {frame.size} values decoded, "
                    f"{expected} expected"
                )
            reference = item.clinfer_frames[index].reshape(-1)
            same = bool(np.array_equal(frame.reshape(-1), reference))
            if not same and label in EXACT_DECODERS:
                raise ValueError(
                    f"{item.name} frame {index}: the values differ from clinfer's "
                    "decoded frame"
                )
            matches = matches and same
    return matches


def _standalone(
    syntax: UID, files: list[_Input]
) -> list[tuple[str, str, Callable[[_Input], list[np.ndarray]]]]:
    """List the standalone decoders installed for a syntax as (label, kind, fn)."""
    found: list[tuple[str, str, Callable[[_Input], list[np.ndarray]]]] = []
    if syntax in NATIVE_SYNTAXES:
        found.append(("numpy", "library", _decode_numpy))
    if syntax == DeflatedExplicitVRLittleEndian:
        found.append(("zlib", "library", _decode_zlib))
    if syntax == RLELossless:
        found.append(("rle", "library", _decode_rle))
    if syntax in JPEG_SYNTAXES or syntax in JPEG_LS_SYNTAXES:
        found.append(("libjpeg", "library", _decode_libjpeg))
    if syntax in JPEG_LS_SYNTAXES:
        found.append(("pyjpegls", "library", _decode_pyjpegls))
    if syntax in J2K_SYNTAXES or syntax in HTJ2K_SYNTAXES:
        found.append(("openjpeg", "library", _decode_openjpeg))
    if syntax == JPEGBaseline8Bit or syntax in J2K_SYNTAXES:
        found.append(("pillow", "library", _decode_pillow))

    if syntax.is_encapsulated:
        for plugin in _plugin_order(syntax):
            found.append((PLUGIN_PREFIX + plugin, "pydicom plugin", _plugin(plugin)))
    elif syntax == DeflatedExplicitVRLittleEndian:
        found.append(("pydicom", "pydicom", _decode_pydicom_deflated))
    else:
        found.append(("pydicom", "pydicom", _plugin("")))
    return found


def _plugin_order(syntax: UID) -> list[str]:
    """Return the installed plugins of a syntax in the order pydicom tries them."""
    decoder = get_decoder(syntax)
    # NOTE: pydicom 3.0.2 tries the plugins in the insertion order of the private
    # ``_available`` dict, while the public ``available_plugins`` is sorted by name.
    available = getattr(decoder, "_available", None)
    if isinstance(available, dict):
        return [str(name) for name in available]
    return list(decoder.available_plugins)


def _clinfer_plugin(item: _Input) -> str:
    """Return the plugin that ``pixel_array`` in clinfer's path decodes a file with.

    Without ``decoding_plugin`` pydicom tries the plugins in order and keeps the
    first that succeeds, so that is the first that decodes the file on its own.
    """
    syntax = item.dataset.file_meta.TransferSyntaxUID
    if not syntax.is_encapsulated:
        return "pydicom (native)"
    decoder = get_decoder(syntax)
    for plugin in _plugin_order(syntax):
        try:
            decoder.as_array(item.dataset, decoding_plugin=plugin)
        except Exception:
            continue
        return plugin
    return "none"


def _count_warnings(files: list[_Input]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decode_frames(item.path)
        counts[item.name] = len(caught)
    return counts


def _plugin(name: str) -> Callable[[_Input], list[np.ndarray]]:
    def decode(item: _Input) -> list[np.ndarray]:
        decoder = get_decoder(item.dataset.file_meta.TransferSyntaxUID)
        if name:
            array, _ = decoder.as_array(item.dataset, decoding_plugin=name)
        else:
            array, _ = decoder.as_array(item.dataset)
        return _split(array, item)

    return decode


def _split(array: np.ndarray, item: _Input) -> list[np.ndarray]:
    if item.number_of_frames == 1:
        return [array]
    return list(array)


def _native_dtype(item: _Input) -> np.dtype:
    return item.clinfer_frames.dtype.newbyteorder("=")


def _decode_numpy(item: _Input) -> list[np.ndarray]:
    dtype = _native_dtype(item)
    if item.dataset.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        stored = dtype.newbyteorder(">")
        return [
            np.frombuffer(frame, dtype=stored).astype(dtype)
            for frame in item.encoded_frames
        ]
    return [np.frombuffer(frame, dtype=dtype).copy() for frame in item.encoded_frames]


def _decode_zlib(item: _Input) -> list[np.ndarray]:
    """Inflate the dataset and take the frames from the end of the stream.

    This assumes that PixelData is the last element of the dataset, which the
    warm-up check confirms by comparing the frames with clinfer's.
    """
    meta_length = int(item.dataset.file_meta.FileMetaInformationGroupLength)
    # 128-byte preamble, "DICM", then the 12-byte group length element.
    body = item.file_bytes[132 + 12 + meta_length :]
    inflated = zlib.decompress(body, -zlib.MAX_WBITS)
    dtype = _native_dtype(item)
    size = item.rows * item.columns * item.samples * dtype.itemsize
    total = size * item.number_of_frames
    pixels = inflated[len(inflated) - total - (total % 2) :][:total]
    return [
        np.frombuffer(pixels[i * size : (i + 1) * size], dtype=dtype).copy()
        for i in range(item.number_of_frames)
    ]


def _decode_pydicom_deflated(item: _Input) -> list[np.ndarray]:
    ds = pydicom.dcmread(io.BytesIO(item.file_bytes))
    array, _ = get_decoder(DeflatedExplicitVRLittleEndian).as_array(ds)
    return _split(array, item)


def _decode_rle(item: _Input) -> list[np.ndarray]:
    from rle.utils import decode_frame

    dtype = _native_dtype(item)
    pixels = item.rows * item.columns
    return [
        np.frombuffer(
            decode_frame(frame, pixels, item.bits_allocated, "<"), dtype=dtype
        )
        for frame in item.encoded_frames
    ]


def _decode_libjpeg(item: _Input) -> list[np.ndarray]:
    from libjpeg import decode

    return [decode(frame) for frame in item.encoded_frames]


def _decode_openjpeg(item: _Input) -> list[np.ndarray]:
    from openjpeg import decode

    return [decode(frame) for frame in item.encoded_frames]


def _decode_pyjpegls(item: _Input) -> list[np.ndarray]:
    from jpeg_ls import decode_from_buffer

    dtype = _native_dtype(item)
    return [
        np.frombuffer(decode_from_buffer(frame), dtype=dtype)
        for frame in item.encoded_frames
    ]


def _decode_pillow(item: _Input) -> list[np.ndarray]:
    from PIL import Image

    frames = []
    for frame in item.encoded_frames:
        with Image.open(io.BytesIO(frame)) as image:
            frames.append(np.asarray(image))
    return frames


def _calibrate(candidate: _Candidate, min_pass_s: float) -> None:
    """Set the loop count so that one measurement lasts at least ``min_pass_s``."""
    start = time.perf_counter()
    candidate.run_pass()
    elapsed = time.perf_counter() - start
    if elapsed <= 0:
        candidate.loops = MAX_LOOPS
        return
    candidate.loops = max(1, min(MAX_LOOPS, math.ceil(min_pass_s / elapsed)))


def _time_pass(candidate: _Candidate) -> float:
    """Return the seconds of one pass, averaged over the candidate's loops."""
    start = time.perf_counter()
    for _ in range(candidate.loops):
        candidate.run_pass()
    return (time.perf_counter() - start) / candidate.loops


def _summarise(record: dict[str, Any], candidates: list[_Candidate]) -> None:
    """Add the medians, the fastest decoder and the plugin comparison to a record."""
    frames = record["frames_per_pass"]
    decoded = record["decoded_bytes_per_pass"]
    decoders: dict[str, dict[str, Any]] = {}
    for candidate in candidates:
        median = statistics.median(candidate.samples_s)
        decoders[candidate.label] = {
            "kind": candidate.kind,
            "median_pass_s": median,
            "pass_s": candidate.samples_s,
            "loops": candidate.loops,
            "frames_per_s": frames / median,
            "mb_per_s": decoded / median / MB,
            "matches_clinfer": candidate.matches_clinfer,
        }
    record["decoders"] = decoders

    clinfer = decoders[CLINFER_DECODE]
    record["clinfer_frames_per_s"] = clinfer["frames_per_s"]
    record["clinfer_mb_per_s"] = clinfer["mb_per_s"]
    pipeline = decoders.get(CLINFER_PIPELINE)
    record["pipeline_frames_per_s"] = pipeline["frames_per_s"] if pipeline else None
    # Share of preprocessing in DecodeStage's own decode_ms and preprocess_ms,
    # median over every pass, which is steadier than comparing separate passes.
    shares = record.pop("preprocess_shares", [])
    record["preprocess_share"] = statistics.median(shares) if shares else None

    standalone = {
        label: entry for label, entry in decoders.items() if entry["kind"] != "clinfer"
    }
    fastest = max(standalone, key=lambda label: standalone[label]["frames_per_s"])
    record["fastest"] = fastest
    record["fastest_frames_per_s"] = standalone[fastest]["frames_per_s"]
    record["fastest_mb_per_s"] = standalone[fastest]["mb_per_s"]

    plugins = {
        label[len(PLUGIN_PREFIX) :]: entry
        for label, entry in standalone.items()
        if label.startswith(PLUGIN_PREFIX)
    }
    used = sorted(set(record["clinfer_plugins"].values()))
    record["clinfer_plugin"] = used[0] if len(used) == 1 else ",".join(used)
    if plugins:
        best = max(plugins, key=lambda name: plugins[name]["frames_per_s"])
        record["fastest_plugin"] = best
        current = plugins.get(record["clinfer_plugin"])
        record["plugin_speedup"] = (
            plugins[best]["frames_per_s"] / current["frames_per_s"] if current else None
        )
    else:
        record["fastest_plugin"] = None
        record["plugin_speedup"] = None


def _ratios(keyword: str, record: dict[str, Any], repeats: int) -> list[Ratio]:
    fastest = record["fastest"]
    denominator = record["fastest_frames_per_s"]
    ratios = [
        Ratio(
            name=f"p4_{keyword}",
            value=record["clinfer_frames_per_s"] / denominator,
            numerator=record["clinfer_frames_per_s"],
            denominator=denominator,
            unit="frames/s",
            description=(
                f"{record['name']}: clinfer decode_frames (file read and decode) "
                f"over the fastest standalone decoder {fastest} on frames in "
                f"memory, median of {repeats}"
            ),
        )
    ]
    if record["pipeline_frames_per_s"] is not None:
        ratios.append(
            Ratio(
                name=f"p4_{keyword}_with_preprocess",
                value=record["pipeline_frames_per_s"] / denominator,
                numerator=record["pipeline_frames_per_s"],
                denominator=denominator,
                unit="frames/s",
                description=(
                    f"{record['name']}: clinfer DecodeStage (decode and "
                    f"preprocess) over the fastest standalone decoder {fastest}, "
                    f"median of {repeats}"
                ),
            )
        )
    return ratios


def _note(keyword: str, record: dict[str, Any]) -> str:
    text = (
        f"{keyword}: clinfer's path decoded with {record['clinfer_plugin']}; the "
        f"fastest standalone decoder was {record['fastest']}"
    )
    speedup = record["plugin_speedup"]
    if record["fastest_plugin"] is not None and speedup is not None:
        if record["fastest_plugin"] == record["clinfer_plugin"]:
            text += ", and clinfer's plugin is already pydicom's fastest."
        else:
            text += (
                f"; decoding_plugin={record['fastest_plugin']!r} would decode "
                f"{speedup:.2f}x as many frames/s as {record['clinfer_plugin']}."
            )
    else:
        text += "."
    return text


def _plots(order: list[str], measured: dict[str, dict[str, Any]]) -> list[Plot]:
    x = [float(index) for index in range(len(order))]

    def series(label: str, key: str) -> Series:
        return Series(label=label, x=x, y=[measured[k][key] for k in order])

    pipeline_x = [
        float(index)
        for index, keyword in enumerate(order)
        if measured[keyword]["pipeline_frames_per_s"] is not None
    ]
    pipeline = Series(
        label=CLINFER_PIPELINE,
        x=pipeline_x,
        y=[measured[order[int(i)]]["pipeline_frames_per_s"] for i in pipeline_x],
    )
    return [
        Plot(
            name="p4_frames_per_s",
            title="Decode frames/s per transfer syntax",
            x_label="transfer syntax",
            y_label="frames/s",
            series=[
                series(CLINFER_DECODE, "clinfer_frames_per_s"),
                pipeline,
                series("fastest standalone decoder", "fastest_frames_per_s"),
            ],
            categories=list(order),
            log_y=True,
        ),
        Plot(
            name="p4_mb_per_s",
            title="Decoded pixel data MB/s per transfer syntax",
            x_label="transfer syntax",
            y_label="MB/s (1e6 bytes)",
            series=[
                series(CLINFER_DECODE, "clinfer_mb_per_s"),
                series("fastest standalone decoder", "fastest_mb_per_s"),
            ],
            categories=list(order),
            log_y=True,
        ),
    ]


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
