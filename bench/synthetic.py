"""Generate many DICOM instances from one corpus file, for throughput and memory runs."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from clinfer.corpus import find_test_file

logger = logging.getLogger(__name__)

INSTANCES_PER_SERIES = 50
SERIES_PER_STUDY = 2


def write_copies(
    out_dir: Path, count: int, *, source: str = "MR_small.dcm"
) -> list[Path]:
    """Write ``count`` copies of a corpus file with new, deterministic UIDs.

    Copies are grouped 50 instances to a series and two series to a study, and keep
    the source's pixel data, so every copy decodes and scores like the source.
    Existing files of the same name are kept, so a rerun with a larger ``count``
    only adds files.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(find_test_file(source))
    paths = []
    for index in range(count):
        path = out_dir / f"instance_{index:06d}.dcm"
        paths.append(path)
        if path.exists():
            continue
        series = index // INSTANCES_PER_SERIES
        study = series // SERIES_PER_STUDY
        template.StudyInstanceUID = generate_uid(entropy_srcs=["study", str(study)])
        template.SeriesInstanceUID = generate_uid(entropy_srcs=["series", str(series)])
        template.SOPInstanceUID = generate_uid(entropy_srcs=["sop", str(index)])
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = index % INSTANCES_PER_SERIES + 1
        template.save_as(path, enforce_file_format=True)
    logger.info("%d synthetic instances in %s", count, out_dir)
    return paths
