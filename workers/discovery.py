"""Find candidate DICOM files under the paths a job is given."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from clinfer.errors import ConfigurationError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    """A regular file found under a job's input paths."""

    path: str
    size: int
    mtime_ns: int


def discover_files(paths: Iterable[str | Path]) -> list[FileEntry]:
    """List every regular file under ``paths``, recursively, sorted by absolute path.

    Files are taken with or without a ``.dcm`` suffix; whether a file is DICOM is decided
    later from its content. Symbolic links to files are followed, links to folders are
    not (so a link cycle cannot make the walk loop).

    Raises
    ------
    ConfigurationError
        If a path does not exist.
    """
    found: dict[str, FileEntry] = {}
    for raw in paths:
        root = Path(raw).expanduser().resolve()
        if not root.exists():
            raise ConfigurationError(f"input path {raw} does not exist")
        candidates = [root] if root.is_file() else _walk(root)
        for path in candidates:
            try:
                stat = path.stat()
            except OSError as exc:
                logger.warning("cannot stat a file under %s: %s", raw, exc.strerror)
                continue
            found[str(path)] = FileEntry(str(path), stat.st_size, stat.st_mtime_ns)
    return [found[key] for key in sorted(found)]


def _walk(root: Path) -> Iterable[Path]:
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(folder) / name
            if path.is_file():
                yield path
