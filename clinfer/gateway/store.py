"""SQLite store of gateway results: response bodies, frames and heatmaps by id."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinfer.errors import ConfigurationError

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    result_id TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    body TEXT NOT NULL,
    frame_png BLOB,
    heatmap_png BLOB
)
"""


@dataclass(frozen=True)
class StoredResult:
    """One result: the JSON response body and the PNGs of its first frame."""

    body: dict[str, Any]
    frame_png: bytes | None
    heatmap_png: bytes | None


class ResultStore:
    """Results by id in one SQLite file, keeping the newest ``max_results``.

    The body contains the hashed StudyInstanceUID, scores and the EMR values used,
    never patient names or IDs. The file still contains clinical data, so it belongs
    in a folder only the gateway's user can read.

    Parameters
    ----------
    path : Path or None
        SQLite file, created with its folder if missing. None keeps the results in
        memory, lost when the process stops.
    max_results : int
        Maximum number of results kept; the oldest are deleted beyond it.

    Raises
    ------
    ConfigurationError
        If ``max_results`` is below 1 or the file cannot be opened or created.
    """

    def __init__(self, path: Path | None, max_results: int) -> None:
        if max_results < 1:
            raise ConfigurationError(
                f"max_results is {max_results}; keep at least 1 result"
            )
        self.path = path
        self.max_results = max_results
        self._lock = threading.Lock()
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                ":memory:" if path is None else str(path), check_same_thread=False
            )
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(
                f"cannot open the gateway results database {path}: {exc}; pass a "
                "writable --state-dir"
            ) from exc
        logger.info("gateway results stored in %s", path or "memory")

    def add(self, result_id: str, stored: StoredResult) -> None:
        """Insert one result and delete the oldest beyond ``max_results``."""
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO results "
                "(result_id, created_at, body, frame_png, heatmap_png) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    result_id,
                    time.time(),
                    json.dumps(stored.body),
                    stored.frame_png,
                    stored.heatmap_png,
                ),
            )
            deleted = self._db.execute(
                "DELETE FROM results WHERE seq <= (SELECT MAX(seq) FROM results) - ?",
                (self.max_results,),
            ).rowcount
        if deleted:
            logger.debug("deleted %d results beyond the limit", deleted)

    def get(self, result_id: str) -> StoredResult | None:
        """Return the result with this id, or None if it is unknown or deleted."""
        with self._lock:
            row = self._db.execute(
                "SELECT body, frame_png, heatmap_png FROM results WHERE result_id = ?",
                (result_id,),
            ).fetchone()
        if row is None:
            return None
        return StoredResult(json.loads(row[0]), row[1], row[2])

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()
