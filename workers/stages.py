"""Ray Data stage functions: header scan, decode and preprocess, Triton inference.

Each stage takes and returns batches in Ray Data's ``numpy`` format (a dict of
arrays). A file that cannot be read or decoded becomes a row with ``ok = False`` and
a reason instead of an exception, so it does not fail the batch it is in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from typing import Any

import numpy as np
from clinfer.client.triton import ModelSpec, TritonModelClient
from clinfer.workers import reasons
from clinfer.workers.dicom_io import InstanceHeader, check_acceptance, read_header
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

from clinfer.errors import DicomInputError, InferenceError

logger = logging.getLogger(__name__)

# EMR join status of an instance: a row was found, none was found (scored by the
# image model alone), or the model takes no EMR input.
EMR_JOINED = "joined"
EMR_MISSING = "missing"
EMR_NOT_USED = "not_used"

HEADER_FIELDS = [field.name for field in dataclasses.fields(InstanceHeader)]


def scan_headers(
    batch: dict[str, np.ndarray], *, strict: bool, accepts: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Read the header of every file in the batch without its pixel data."""
    rows: list[dict[str, Any]] = []
    for path in batch["path"]:
        path = str(path)
        row: dict[str, Any] = {name: "" for name in HEADER_FIELDS}
        row.update(
            path=path,
            number_of_frames=0,
            samples_per_pixel=0,
            rows=0,
            columns=0,
            bits_stored=0,
            reason="",
            message="",
        )
        try:
            header = read_header(path, strict=strict)
        except DicomInputError as exc:
            row.update(reason=exc.reason, message=str(exc))
        except Exception as exc:  # pydicom raises many types on malformed input
            row.update(
                reason=reasons.INVALID_DICOM,
                message=f"{path}: reading the DICOM header failed: {exc}",
            )
        else:
            row.update(dataclasses.asdict(header))
            rejected = check_acceptance(header, accepts)
            if rejected is not None:
                row.update(reason=rejected[0], message=rejected[1])
        rows.append(row)
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


class DecodeStage:
    """Decode and preprocess instances into one row per frame."""

    def __init__(self, *, height: int, width: int, strict: bool):
        self.config = PreprocessConfig(height=height, width=width)
        self.strict = strict

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        tensors: list[np.ndarray] = []
        blank = np.zeros((1, self.config.height, self.config.width), dtype=np.float32)
        for index, (path, uid) in enumerate(
            zip(batch["path"], batch["sop_instance_uid"])
        ):
            base: dict[str, Any] = {"path": str(path), "sop_instance_uid": str(uid)}
            if "emr" in batch:
                base["emr"] = np.asarray(batch["emr"][index], dtype=np.float32)
                base["emr_status"] = str(batch["emr_status"][index])
            try:
                instance = load_and_preprocess(
                    str(path), self.config, strict=self.strict
                )
            except DicomInputError as exc:
                rows.append(
                    {
                        **base,
                        "frame_index": -1,
                        "num_frames": 0,
                        "ok": False,
                        "reason": exc.reason,
                        "message": str(exc),
                        "decode_ms": 0.0,
                        "preprocess_ms": 0.0,
                        "settings": "{}",
                    }
                )
                tensors.append(blank)
                continue
            except Exception as exc:
                rows.append(
                    {
                        **base,
                        "frame_index": -1,
                        "num_frames": 0,
                        "ok": False,
                        "reason": reasons.PREPROCESS_FAILED,
                        "message": f"{path}: preprocessing failed: "
                        f"{type(exc).__name__}: {exc}",
                        "decode_ms": 0.0,
                        "preprocess_ms": 0.0,
                        "settings": "{}",
                    }
                )
                tensors.append(blank)
                continue
            settings = json.dumps(instance.settings, sort_keys=True)
            count = instance.frames.shape[0]
            for index in range(count):
                rows.append(
                    {
                        **base,
                        "frame_index": index,
                        "num_frames": count,
                        "ok": True,
                        "reason": "",
                        "message": "",
                        "decode_ms": instance.decode_ms / count,
                        "preprocess_ms": instance.preprocess_ms / count,
                        "settings": settings,
                    }
                )
                tensors.append(instance.frames[index])
        out = {key: np.array([r[key] for r in rows]) for key in rows[0]}
        out["tensor"] = np.stack(tensors).astype(np.float32, copy=False)
        return out


class InferStage:
    """Send batches of preprocessed frames to Triton over gRPC.

    Batches are spread round-robin over the given servers. A failed request is retried
    on the next server, up to ``retries`` attempts in all, and then fails the job.
    The results written so far stay, and a rerun resumes from them.
    """

    def __init__(
        self,
        *,
        urls: list[str],
        spec: dict[str, Any],
        priority: int,
        retries: int = 3,
        shared_memory: bool = False,
    ):
        self.spec = ModelSpec(**{**spec, "labels": tuple(spec["labels"])})
        self.clients = [
            TritonModelClient(
                u, self.spec.name, self.spec.version, shared_memory=shared_memory
            )
            for u in urls
        ]
        self.priority = priority
        self.retries = max(retries, 1)
        self._next = random.randrange(len(self.clients))

    def __del__(self) -> None:
        # Ray Data drops the UDF when its actor exits gracefully, which releases the
        # clients' shared memory regions on the servers.
        for client in getattr(self, "clients", []):
            client.close()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["ok"].astype(bool)
        n = ok.shape[0]
        width = len(self.spec.labels)
        scores = np.full((n, width), np.nan, dtype=np.float32)
        image_scores = np.full((n, width), np.nan, dtype=np.float32)
        emr_scores = np.full((n, width), np.nan, dtype=np.float32)
        infer_ms = np.zeros(n, dtype=np.float64)
        server = np.array([""] * n, dtype=object)
        # The request's round trip, on its first row only, for the job's metrics.
        request_ms = np.full(n, np.nan, dtype=np.float64)

        if ok.any():
            images = batch["tensor"][ok]
            emr = batch["emr"][ok] if self.spec.emr_input else None
            start = time.perf_counter()
            outputs, url = self._infer_with_retries(images, emr)
            elapsed_ms = (time.perf_counter() - start) * 1000.0
            scores[ok] = outputs[self.spec.output_name]
            if self.spec.image_output:
                image_scores[ok] = outputs[self.spec.image_output]
            if self.spec.emr_output:
                emr_scores[ok] = outputs[self.spec.emr_output]
            if self.spec.emr_input:
                # A study without an EMR row is scored by the image model alone.
                missing = ok & (batch["emr_status"] == EMR_MISSING)
                scores[missing] = image_scores[missing]
                emr_scores[missing] = np.nan
            infer_ms[ok] = elapsed_ms / images.shape[0]
            server[ok] = url
            request_ms[int(np.argmax(ok))] = elapsed_ms

        out = {
            key: value for key, value in batch.items() if key not in ("tensor", "emr")
        }
        out.update(
            scores=scores,
            image_scores=image_scores,
            emr_scores=emr_scores,
            infer_ms=infer_ms,
            server=server.astype(str),
            request_ms=request_ms,
        )
        return out

    def _infer_with_retries(
        self, images: np.ndarray, emr: np.ndarray | None
    ) -> tuple[dict[str, np.ndarray], str]:
        last: InferenceError | None = None
        for attempt in range(self.retries):
            client = self.clients[self._next]
            self._next = (self._next + 1) % len(self.clients)
            try:
                if emr is not None:
                    outputs = client.infer_multimodal(
                        images, emr, self.spec, priority=self.priority
                    )
                else:
                    probabilities = client.infer(
                        images, self.spec, priority=self.priority
                    )
                    outputs = {self.spec.output_name: probabilities}
                return outputs, client.url
            except InferenceError as exc:
                last = exc
                logger.warning(
                    "inference attempt %d of %d failed: %s",
                    attempt + 1,
                    self.retries,
                    exc,
                )
                time.sleep(min(0.5 * 2**attempt, 4.0))
        assert last is not None
        raise last


class ScoreStage:
    """Decode, preprocess and score instances in one actor, one row per frame.

    The float32 model inputs stay in the actor's memory between decoding and the
    request to Triton, so they are never serialised into Ray's object store. The
    frames of a batch of instances go to Triton in requests of at most
    ``request_size`` rows. Rows are as :class:`InferStage` returns them.
    """

    def __init__(
        self,
        *,
        height: int,
        width: int,
        strict: bool,
        urls: list[str],
        spec: dict[str, Any],
        priority: int,
        request_size: int,
        retries: int = 3,
        shared_memory: bool = True,
    ):
        if request_size < 1:
            raise ValueError(
                f"request_size must be at least 1, got {request_size}; pass the "
                "frames per Triton request (the job's batch_size)."
            )
        self.decode = DecodeStage(height=height, width=width, strict=strict)
        self.infer = InferStage(
            urls=urls,
            spec=spec,
            priority=priority,
            retries=retries,
            shared_memory=shared_memory,
        )
        self.request_size = request_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Instances are decoded one at a time and sent as soon as a full request's
        # frames are waiting, so at most one request plus one instance's frames are
        # held in memory.
        waiting: list[dict[str, np.ndarray]] = []
        waiting_rows = 0
        scored: list[dict[str, np.ndarray]] = []
        for index in range(len(batch["path"])):
            decoded = self.decode(
                {key: value[index : index + 1] for key, value in batch.items()}
            )
            waiting.append(decoded)
            waiting_rows += len(decoded["ok"])
            if waiting_rows < self.request_size:
                continue
            frames = _concat(waiting)
            while waiting_rows >= self.request_size:
                scored.append(self.infer(_rows(frames, 0, self.request_size)))
                frames = _rows(frames, self.request_size, waiting_rows)
                waiting_rows -= self.request_size
            waiting = [frames] if waiting_rows else []
        if waiting:
            scored.append(self.infer(_concat(waiting)))
        return _concat(scored)


def _rows(batch: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {key: value[start:stop] for key, value in batch.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
