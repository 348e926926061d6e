"""SQLite store for scoring results, failures and resume state.

One database file per output folder (``<out>/results.sqlite``). Tables:

- ``instances``: one row per scored instance and model version, primary key
  (sop_instance_uid, model_name, model_version). Multi-frame instances store the
  per-frame scores and the instance score (the maximum positive-class probability over
  frames).
- ``studies``: one row per study and model version, aggregated from ``instances``.
- ``failures``: one row per file and model version that was not scored, with outcome
  (``failed`` or ``skipped``), reason code and message. A later successful score of the
  same file deletes its row.
- ``files``: the size and modification time of every file seen, so that a rerun skips
  unchanged files that are already scored or skipped without reading them again.
- ``jobs``: one row per job run with its counts.

Every write is a transaction, so a job killed midway leaves only whole rows behind.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    modality TEXT NOT NULL,
    num_frames INTEGER NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    scores_json TEXT NOT NULL,
    frame_scores_json TEXT NOT NULL,
    threshold REAL NOT NULL,
    decode_ms REAL NOT NULL,
    preprocess_ms REAL NOT NULL,
    infer_ms REAL NOT NULL,
    preprocessing_json TEXT NOT NULL,
    job_id TEXT NOT NULL,
    scored_at REAL NOT NULL,
    emr_status TEXT NOT NULL DEFAULT 'not_used',
    outputs_json TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (sop_instance_uid, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    num_series INTEGER NOT NULL,
    num_instances INTEGER NOT NULL,
    label TEXT NOT NULL,
    score REAL NOT NULL,
    threshold REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (study_instance_uid, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    sop_instance_uid TEXT,
    job_id TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (path, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS dicom_outputs (
    study_instance_uid TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    sr_path TEXT,
    sc_path TEXT,
    written_at REAL NOT NULL,
    PRIMARY KEY (study_instance_uid, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    sop_instance_uid TEXT,
    PRIMARY KEY (path, model_name, model_version)
);
"""


@dataclass(frozen=True)
class InstanceResult:
    """The result of scoring one instance."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: str
    modality: str
    num_frames: int
    label: str
    score: float
    scores: dict[str, float]
    frame_scores: list[float]
    threshold: float
    decode_ms: float
    preprocess_ms: float
    infer_ms: float
    preprocessing: dict[str, Any]
    emr_status: str = "not_used"
    outputs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A file that was not scored, with its outcome and reason."""

    path: str
    outcome: str
    reason: str
    message: str
    sop_instance_uid: str | None = None


class ResultStore:
    """Results of one output folder, for one model name and version at a time."""

    def __init__(
        self, path: Path, *, model_name: str, model_version: str, model_sha256: str
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.model_name = model_name
        self.model_version = model_version
        self.model_sha256 = model_sha256
        self._db = sqlite3.connect(self.path, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()
        self._db.commit()

    def _add_missing_columns(self) -> None:
        # Databases written before the EMR columns existed get them with defaults.
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(instances)")}
        for name, definition in (
            ("emr_status", "TEXT NOT NULL DEFAULT 'not_used'"),
            ("outputs_json", "TEXT NOT NULL DEFAULT '{}'"),
        ):
            if name not in columns:
                self._db.execute(
                    f"ALTER TABLE instances ADD COLUMN {name} {definition}"
                )

    @property
    def _model(self) -> tuple[str, str]:
        return (self.model_name, self.model_version)

    def close(self) -> None:
        self._db.close()

    # Jobs

    def start_job(self, job_id: str) -> None:
        """Record a new running job; jobs left running by a killed process end."""
        with self._db:
            self._db.execute(
                "UPDATE jobs SET status = 'interrupted' WHERE status = 'running' AND "
                "model_name = ? AND model_version = ?",
                self._model,
            )
            self._db.execute(
                "INSERT INTO jobs (job_id, started_at, model_name, model_version, "
                "model_sha256, status) VALUES (?, ?, ?, ?, ?, 'running')",
                (job_id, time.time(), *self._model, self.model_sha256),
            )

    def finish_job(self, job_id: str, status: str, summary: dict[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "UPDATE jobs SET finished_at = ?, status = ?, summary_json = ? "
                "WHERE job_id = ?",
                (time.time(), status, json.dumps(summary, sort_keys=True), job_id),
            )

    # Resume state

    def known_files(self) -> dict[str, tuple[int, int, str]]:
        """Return path -> (size, mtime_ns, status) for files seen with this model version."""
        rows = self._db.execute(
            "SELECT path, size, mtime_ns, status FROM files "
            "WHERE model_name = ? AND model_version = ?",
            self._model,
        )
        return {path: (size, mtime, status) for path, size, mtime, status in rows}

    def scored_paths(self) -> dict[str, str]:
        """Return SOPInstanceUID -> path of the instances scored with this version."""
        rows = self._db.execute(
            "SELECT sop_instance_uid, path FROM instances WHERE model_name = ? AND "
            "model_version = ?",
            self._model,
        )
        return dict(rows.fetchall())

    def file_uids(self) -> dict[str, str]:
        """Return path -> SOPInstanceUID recorded for each file seen before."""
        rows = self._db.execute(
            "SELECT path, sop_instance_uid FROM files WHERE model_name = ? AND "
            "model_version = ? AND sop_instance_uid IS NOT NULL",
            self._model,
        )
        return dict(rows.fetchall())

    def move_instance(self, sop_instance_uid: str, path: str) -> None:
        """Point a scored instance at the new path of its file."""
        with self._db:
            self._db.execute(
                "UPDATE instances SET path = ? WHERE sop_instance_uid = ? AND "
                "model_name = ? AND model_version = ?",
                (path, sop_instance_uid, *self._model),
            )

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Delete a scored instance whose file no longer contains it."""
        with self._db:
            self._db.execute(
                "DELETE FROM instances WHERE sop_instance_uid = ? AND model_name = ? "
                "AND model_version = ?",
                (sop_instance_uid, *self._model),
            )

    def scored_uids(self) -> set[str]:
        rows = self._db.execute(
            "SELECT sop_instance_uid FROM instances WHERE model_name = ? AND model_version = ?",
            self._model,
        )
        return {uid for (uid,) in rows}

    def record_files(
        self, rows: Iterable[tuple[str, int, int, str, str | None]]
    ) -> None:
        """Upsert (path, size, mtime_ns, status, sop_instance_uid) rows."""
        with self._db:
            self._db.executemany(
                "INSERT INTO files (path, model_name, model_version, size, mtime_ns, status, "
                "sop_instance_uid) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (path, model_name, model_version) DO UPDATE SET "
                "size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "status = excluded.status, sop_instance_uid = excluded.sop_instance_uid",
                [(p, *self._model, s, m, st, uid) for p, s, m, st, uid in rows],
            )

    # Writes

    def record_failures(self, failures: Iterable[Failure], job_id: str) -> None:
        now = time.time()
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO failures (path, model_name, model_version, outcome, "
                "reason, message, sop_instance_uid, job_id, recorded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f.path,
                        *self._model,
                        f.outcome,
                        f.reason,
                        f.message,
                        f.sop_instance_uid,
                        job_id,
                        now,
                    )
                    for f in failures
                ],
            )

    def write_instances(
        self,
        results: Iterable[InstanceResult],
        job_id: str,
        file_stats: dict[str, tuple[int, int]],
    ) -> int:
        """Insert results, clear their failure rows and mark their files scored.

        Returns the number of rows inserted. A result whose key already exists is not
        inserted, so a result can never be stored twice.
        """
        now = time.time()
        inserted = 0
        with self._db:
            for r in results:
                cursor = self._db.execute(
                    "INSERT INTO instances (sop_instance_uid, model_name, model_version, "
                    "model_sha256, study_instance_uid, series_instance_uid, path, modality, "
                    "num_frames, label, score, scores_json, frame_scores_json, threshold, "
                    "decode_ms, preprocess_ms, infer_ms, preprocessing_json, job_id, "
                    "scored_at, emr_status, outputs_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (
                        r.sop_instance_uid,
                        *self._model,
                        self.model_sha256,
                        r.study_instance_uid,
                        r.series_instance_uid,
                        r.path,
                        r.modality,
                        r.num_frames,
                        r.label,
                        r.score,
                        json.dumps(r.scores),
                        json.dumps(r.frame_scores),
                        r.threshold,
                        r.decode_ms,
                        r.preprocess_ms,
                        r.infer_ms,
                        json.dumps(r.preprocessing, sort_keys=True),
                        job_id,
                        now,
                        r.emr_status,
                        json.dumps(r.outputs, sort_keys=True),
                    ),
                )
                inserted += cursor.rowcount
                self._db.execute(
                    "DELETE FROM failures WHERE path = ? AND model_name = ? AND "
                    "model_version = ?",
                    (r.path, *self._model),
                )
                size, mtime = file_stats[r.path]
                self._db.execute(
                    "INSERT OR REPLACE INTO files (path, model_name, model_version, size, "
                    "mtime_ns, status, sop_instance_uid) VALUES (?, ?, ?, ?, ?, 'scored', ?)",
                    (r.path, *self._model, size, mtime, r.sop_instance_uid),
                )
        return inserted

    def update_studies(self, positive_label: str, negative_label: str) -> int:
        """Recompute the study rows of this model version from its instance rows.

        A study's score is the maximum instance score; its label is the positive label
        when that score reaches the threshold. Returns the number of studies.
        """
        now = time.time()
        with self._db:
            self._db.execute(
                "DELETE FROM studies WHERE model_name = ? AND model_version = ?",
                self._model,
            )
            self._db.execute(
                "INSERT INTO studies (study_instance_uid, model_name, model_version, "
                "model_sha256, num_series, num_instances, label, score, threshold, "
                "updated_at) "
                "SELECT study_instance_uid, model_name, model_version, MAX(model_sha256), "
                "COUNT(DISTINCT series_instance_uid), COUNT(*), "
                "CASE WHEN MAX(score) >= MAX(threshold) THEN ? ELSE ? END, MAX(score), "
                "MAX(threshold), ? FROM instances WHERE model_name = ? AND "
                "model_version = ? GROUP BY study_instance_uid",
                (positive_label, negative_label, now, *self._model),
            )
            count = self._db.execute(
                "SELECT COUNT(*) FROM studies WHERE model_name = ? AND model_version = ?",
                self._model,
            ).fetchone()[0]
        return int(count)

    # Reads

    def count(self, table: str) -> int:
        if table not in {"instances", "studies", "failures"}:
            raise ValueError(f"unknown table {table!r}")
        row = self._db.execute(
            f"SELECT COUNT(*) FROM {table} WHERE model_name = ? AND model_version = ?",
            self._model,
        ).fetchone()
        return int(row[0])

    def failure_counts(self) -> dict[tuple[str, str], int]:
        rows = self._db.execute(
            "SELECT outcome, reason, COUNT(*) FROM failures WHERE model_name = ? AND "
            "model_version = ? GROUP BY outcome, reason",
            self._model,
        )
        return {(outcome, reason): n for outcome, reason, n in rows}

    def studies_without_outputs(self) -> list[tuple[str, float]]:
        """Return (StudyInstanceUID, score) of studies with no DICOM outputs yet."""
        rows = self._db.execute(
            "SELECT s.study_instance_uid, s.score FROM studies s LEFT JOIN "
            "dicom_outputs o ON o.study_instance_uid = s.study_instance_uid AND "
            "o.model_name = s.model_name AND o.model_version = s.model_version "
            "WHERE s.model_name = ? AND s.model_version = ? AND o.written_at IS NULL "
            "ORDER BY s.study_instance_uid",
            self._model,
        )
        return [(uid, float(score)) for uid, score in rows]

    def study_instances(self, study_instance_uid: str) -> list[tuple[str, str, float]]:
        """Return (path, SOPInstanceUID, score) of a study's instances, best first."""
        rows = self._db.execute(
            "SELECT path, sop_instance_uid, score FROM instances WHERE "
            "study_instance_uid = ? AND model_name = ? AND model_version = ? "
            "ORDER BY score DESC, sop_instance_uid",
            (study_instance_uid, *self._model),
        )
        return [(path, uid, float(score)) for path, uid, score in rows]

    def record_outputs(
        self, study_instance_uid: str, sr_path: str | None, sc_path: str | None
    ) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO dicom_outputs (study_instance_uid, model_name, "
                "model_version, sr_path, sc_path, written_at) VALUES (?, ?, ?, ?, ?, ?)",
                (study_instance_uid, *self._model, sr_path, sc_path, time.time()),
            )

    def series_count(self) -> int:
        row = self._db.execute(
            "SELECT COUNT(DISTINCT series_instance_uid) FROM instances WHERE model_name = ? "
            "AND model_version = ?",
            self._model,
        ).fetchone()
        return int(row[0])
