"""Append-only JSON-lines audit log of gateway queries."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from clinfer.errors import ConfigurationError


@dataclass(frozen=True)
class AuditEntry:
    """One query: who sent it, on which study (hashed), with which model and result."""

    user: str | None
    route: str
    study: str | None
    """``clinfer.privacy.short_hash`` of the StudyInstanceUID, never the UID."""
    model: str | None
    model_version: str | None
    outcome: str
    status_code: int
    result_id: str | None = None


class AuditLog:
    """Appends one JSON line per entry, with a UTC timestamp, to a file.

    Raises
    ------
    ConfigurationError
        If the file's folder cannot be created.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the audit log folder {self.path.parent}: {exc}"
            ) from exc
        self._lock = threading.Lock()

    def append(self, entry: AuditEntry) -> None:
        """Write ``entry`` as one line; the file is opened in append mode each time."""
        record = {"time": datetime.now(UTC).isoformat(), **asdict(entry)}
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
