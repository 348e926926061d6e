"""Locate the DICOM test corpus shipped by pydicom and pydicom-data."""

from __future__ import annotations

from pathlib import Path

import pydicom

from clinfer.errors import ConfigurationError


def corpus_dirs() -> list[Path]:
    """Return the folders of the installed DICOM test corpus.

    The first folder is ``pydicom/data/test_files`` (shipped inside pydicom), the
    second is ``data_store/data`` (the pydicom-data package, which contains the larger
    files such as the WG04 compression set).

    Returns
    -------
    list[Path]
        The two folders, in that order.

    Raises
    ------
    ConfigurationError
        If pydicom-data is not installed or either folder is missing.
    """
    try:
        import data_store
    except ImportError as exc:
        raise ConfigurationError(
            "The pydicom-data package is not installed, so the larger test files "
            "are missing. Install it with `pip install pydicom-data==1.0.0`."
        ) from exc

    dirs = [
        Path(pydicom.__file__).parent / "data" / "test_files",
        Path(data_store.__file__).parent / "data",
    ]
    for folder in dirs:
        if not folder.is_dir():
            raise ConfigurationError(
                f"The test corpus folder {folder} does not exist. Reinstall pydicom "
                "and pydicom-data (`pip install --force-reinstall pydicom==3.0.2 "
                "pydicom-data==1.0.0`)."
            )
    return dirs


def find_test_file(name: str) -> Path:
    """Find a corpus file by its name or by its path relative to a corpus folder.

    Parameters
    ----------
    name : str
        A file name such as ``"CT_small.dcm"`` or a relative path such as
        ``"dicomdirtests/DICOMDIR"``. The folders are searched in the order of
        :func:`corpus_dirs`, first for the exact relative path and then for a file
        of that name anywhere below the folder.

    Returns
    -------
    Path
        The first match.

    Raises
    ------
    FileNotFoundError
        If no corpus folder contains the file.
    ConfigurationError
        If the corpus is not installed (see :func:`corpus_dirs`).
    """
    dirs = corpus_dirs()
    for folder in dirs:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    for folder in dirs:
        for candidate in sorted(folder.rglob(Path(name).name)):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(folder) for folder in dirs)
    raise FileNotFoundError(
        f"No test file named {name!r} in the corpus folders ({searched}). Check "
        "the spelling. pydicom 3.0.2 and pydicom-data 1.0.0 are the versions whose "
        "files this project uses."
    )
