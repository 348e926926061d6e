"""Log-safe stand-ins for identifiers that may carry PHI."""

from __future__ import annotations

import hashlib
from os import PathLike


def short_hash(value: str | PathLike[str]) -> str:
    """Return the first 12 hex digits of the SHA-256 of ``value``.

    Logs name a UID or a file path by this digest: hospital exports often put patient
    names or IDs into folder names, and UIDs can be linked back to a patient.
    """
    return hashlib.sha256(str(value).encode()).hexdigest()[:12]
