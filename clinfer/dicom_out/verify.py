"""Run dicom3tools' ``dciodvfy`` IOD checker on a written DICOM file."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from clinfer.errors import ConfigurationError

logger = logging.getLogger(__name__)


def dciodvfy_errors(path: Path, *, timeout_s: float = 60.0) -> list[str]:
    """Return the ``Error`` lines that ``dciodvfy`` prints for a file.

    Warnings are not returned. ``dciodvfy`` is in Debian's ``dicom3tools`` package.

    Raises
    ------
    ConfigurationError
        If ``dciodvfy`` is not on PATH, or it times out.
    """
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise ConfigurationError(
            "dciodvfy not found on PATH; install it with `apt-get install dicom3tools`"
        )
    try:
        completed = subprocess.run(
            [executable, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigurationError(
            f"dciodvfy timed out after {timeout_s} s on {path}"
        ) from exc
    lines = (completed.stdout + completed.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]
