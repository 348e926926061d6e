"""Real-time queries of one study against Triton, with failover across servers."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from clinfer.client.results import InstanceScore, QueryResult, QueryTiming, SkippedFile
from clinfer.client.triton import ModelSpec
from clinfer.export.repository import (
    COMPUTE_OUTPUT,
    REALTIME_MODEL_PARAMETER,
    REALTIME_PRIORITY,
)
from clinfer.workers import reasons
from clinfer.workers.dicom_io import (
    InstanceHeader,
    check_acceptance,
    is_dicom_suffix,
    read_header,
)
from clinfer.workers.discovery import discover_files
from clinfer.workers.preprocess import (
    PreprocessConfig,
    PreprocessedInstance,
    load_and_preprocess,
)
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from clinfer.errors import (
    ClinferError,
    DicomInputError,
    EmrInputError,
    ModelSpecError,
    QueryError,
    ServerUnavailableError,
)
from clinfer.metrics import ClientQueryMetrics, client_query_metrics

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "cxr_resnet"
SALIENCY_OUTPUT = "saliency"
EMR_INPUT = "emr"
# gRPC status codes that mean the server could not be reached at all.
UNREACHABLE_STATUSES = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")

StrPath = str | PathLike[str]
EmrSource = Mapping[str, Any] | StrPath


@dataclass(frozen=True)
class ServedModel:
    """A model as one Triton server serves it: the clinfer spec and tensor names."""

    spec: ModelSpec
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    emr_features: tuple[str, ...] = ()
    model_name: str = ""
    """The clinfer model name. It differs from ``spec.name``, the Triton model that
    is sent requests, when a dedicated real-time model serves the query."""

    @property
    def has_saliency(self) -> bool:
        return SALIENCY_OUTPUT in self.output_names

    @property
    def has_compute_time(self) -> bool:
        return COMPUTE_OUTPUT in self.output_names

    @property
    def has_emr(self) -> bool:
        return EMR_INPUT in self.input_names


@dataclass
class PreparedStudy:
    """Preprocessed model inputs of one study, ready to send."""

    study_instance_uid: str
    headers: list[InstanceHeader]
    instances: list[PreprocessedInstance]
    skipped: list[SkippedFile]
    preprocess_ms: float
    size: tuple[int, int]
    images: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.images = np.concatenate([i.frames for i in self.instances], axis=0)


@dataclass(frozen=True)
class _Response:
    probabilities: np.ndarray
    saliency: np.ndarray | None
    infer_ms: float | None
    round_trip_ms: float


def load_emr(
    source: EmrSource | None, header: InstanceHeader | None = None
) -> dict[str, Any] | None:
    """Load one EMR record from a mapping, a JSON object file or a CSV file row.

    Parameters
    ----------
    source : Mapping, str, os.PathLike or None
        The record itself, a ``.json`` file containing one object, or a ``.csv``
        file with a header row. A CSV file with several rows must have a
        ``patient_id`` column, and the row whose value equals the study's
        PatientID is used.
    header : InstanceHeader, optional
        A header of the study, used to pick the CSV row.

    Returns
    -------
    dict or None
        The record, or None when ``source`` is None.

    Raises
    ------
    QueryError
        If the file cannot be read or parsed, or no single row matches the study.
    """
    if source is None:
        return None
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QueryError(f"cannot read the EMR file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QueryError(f"EMR file {path} is not valid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise QueryError(
                f"EMR file {path} must contain one JSON object, got "
                f"{type(record).__name__}."
            )
        return record
    if path.suffix.lower() == ".csv":
        return _emr_csv_row(path, text, header)
    raise QueryError(
        f"EMR file {path} has suffix {path.suffix!r}; pass a .json or .csv file."
    )


def _emr_csv_row(
    path: Path, text: str, header: InstanceHeader | None
) -> dict[str, Any]:
    rows = list(csv.DictReader(text.splitlines()))
    if len(rows) == 1:
        return dict(rows[0])
    if not rows:
        raise QueryError(f"EMR file {path} has no data rows.")
    if header is None or "patient_id" not in rows[0]:
        raise QueryError(
            f"EMR file {path} has {len(rows)} rows and no way to pick one; pass a "
            "file with one row or a patient_id column matching the study's PatientID."
        )
    matches = [row for row in rows if row["patient_id"] == header.patient_id]
    if len(matches) != 1:
        raise QueryError(
            f"EMR file {path} has {len(matches)} rows whose patient_id matches the "
            "study's PatientID, expected 1; fix the file or pass the record directly."
        )
    return dict(matches[0])


def prepare_study(paths: Sequence[StrPath], spec: ModelSpec) -> PreparedStudy:
    """Read and preprocess every DICOM file of one study with the workers' code.

    Files are found as the batch job finds them (``discover_files``), headers are
    checked with ``check_acceptance`` and frames are built by ``load_and_preprocess``,
    so a query sends the same tensors as ``clinfer score``.

    Parameters
    ----------
    paths : sequence of str or os.PathLike
        DICOM files or folders, searched recursively.
    spec : ModelSpec
        The model's spec, for its input size and accepted images.

    Returns
    -------
    PreparedStudy
        Headers, preprocessed instances, the files skipped and the elapsed time.

    Raises
    ------
    DicomInputError
        If a file is not valid DICOM, cannot be decoded or preprocessed, or is not
        accepted by the model. Files whose reason is a skip outcome (a DICOMDIR, a
        non-DICOM name in a folder, a duplicate instance) are listed in ``skipped``
        instead.
    QueryError
        If the paths contain no scorable instance or more than one study.
    """
    started = time.perf_counter()
    try:
        files = discover_files(paths)
    except OSError as exc:
        raise QueryError(
            f"cannot list the query paths {list(map(str, paths))}: {exc}"
        ) from exc
    config = PreprocessConfig(height=spec.height, width=spec.width)
    headers: list[InstanceHeader] = []
    instances: list[PreprocessedInstance] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()
    for entry in files:
        try:
            try:
                header = read_header(entry.path)
            except DicomInputError as exc:
                if exc.reason == reasons.NOT_DICOM and not is_dicom_suffix(entry.path):
                    raise DicomInputError(reasons.NON_DICOM_FILE, str(exc)) from exc
                raise
            if header.sop_instance_uid in seen:
                raise DicomInputError(
                    reasons.DUPLICATE_INSTANCE,
                    f"{entry.path} repeats an instance already in the query; it is "
                    "scored once.",
                )
            rejected = check_acceptance(header, spec.accepts)
            if rejected is not None:
                raise DicomInputError(rejected[0], rejected[1])
            instance = load_and_preprocess(entry.path, config)
        except DicomInputError as exc:
            if reasons.outcome_of(exc.reason) != reasons.SKIPPED or exc.reason in (
                reasons.MODALITY_NOT_ACCEPTED,
                reasons.IMAGE_TYPE_NOT_ACCEPTED,
            ):
                raise
            skipped.append(SkippedFile(str(entry.path), exc.reason, str(exc)))
            continue
        except OSError as exc:
            raise DicomInputError(
                reasons.INVALID_DICOM, f"cannot read {entry.path}: {exc}"
            ) from exc
        seen.add(header.sop_instance_uid)
        headers.append(header)
        instances.append(instance)

    if not instances:
        raise QueryError(
            f"no DICOM instance to score under {[str(p) for p in paths]}; pass the "
            "study's image files or its folder."
        )
    studies = {h.study_instance_uid for h in headers}
    if len(studies) > 1:
        raise QueryError(
            f"the query paths contain {len(studies)} studies; query one study at a "
            "time or use `clinfer score` for many."
        )
    return PreparedStudy(
        study_instance_uid=headers[0].study_instance_uid,
        headers=headers,
        instances=instances,
        skipped=skipped,
        preprocess_ms=(time.perf_counter() - started) * 1000.0,
        size=(spec.height, spec.width),
    )


def _served_model(
    config: dict[str, Any], metadata: dict[str, Any], version: str | None
) -> ServedModel:
    resolved = version or max(metadata.get("versions", ["1"]), key=int)
    spec = ModelSpec.from_config(config, resolved)
    raw = json.loads(config["parameters"]["clinfer_spec"]["string_value"])
    return ServedModel(
        spec=spec,
        input_names=tuple(i["name"] for i in metadata.get("inputs", [])),
        output_names=tuple(o["name"] for o in metadata.get("outputs", [])),
        emr_features=tuple(raw.get("emr", {}).get("features", [])),
        model_name=spec.name,
    )


def _realtime_model_name(config: dict[str, Any]) -> str | None:
    parameter = config.get("parameters", {}).get(REALTIME_MODEL_PARAMETER, {})
    return parameter.get("string_value") or None


def _use_realtime(batch: ServedModel, realtime: ServedModel, url: str) -> ServedModel:
    if realtime.spec.sha256 != batch.spec.sha256:
        logger.warning(
            "real-time model %s on %s has sha256 %s, not %s of %s; using %s",
            realtime.spec.name,
            url,
            realtime.spec.sha256[:12],
            batch.spec.sha256[:12],
            batch.spec.name,
            batch.spec.name,
        )
        return batch
    return replace(realtime, model_name=batch.spec.name)


def _emr_array(
    model: ServedModel, record: Mapping[str, Any], frames: int
) -> np.ndarray:
    # One FP32 row per frame, in the order of the spec's emr.features list.
    if not model.emr_features:
        raise ModelSpecError(
            f"model {model.spec.name!r} has an {EMR_INPUT!r} input but its clinfer "
            "spec has no emr.features list; re-export it with the feature order."
        )
    from clinfer.train.emr import model_inputs

    try:
        values = model_inputs(record)
        row = [values[name] for name in model.emr_features]
    except ValueError as exc:
        raise EmrInputError(
            f"invalid EMR record for {model.spec.name!r}: {exc}."
        ) from exc
    except KeyError as exc:
        raise QueryError(
            f"model {model.spec.name!r} needs the EMR input {exc}, which this clinfer "
            f"version does not derive; it derives {list(values)}."
        ) from exc
    return np.tile(np.asarray(row, dtype=np.float32), (frames, 1))


def _build_inputs(
    model: ServedModel, images: np.ndarray, emr: Mapping[str, Any] | None
) -> tuple[list[Any], list[Any]]:
    image = triton_grpc.InferInput(model.spec.input_name, list(images.shape), "FP32")
    image.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    inputs = [image]
    if model.has_emr:
        if emr is None:
            raise QueryError(
                f"model {model.spec.name!r} needs an EMR record; pass --emr FILE."
            )
        values = _emr_array(model, emr, images.shape[0])
        tensor = triton_grpc.InferInput(EMR_INPUT, list(values.shape), "FP32")
        tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    names = [model.spec.output_name]
    if model.has_saliency:
        names.append(SALIENCY_OUTPUT)
    if model.has_compute_time:
        names.append(COMPUTE_OUTPUT)
    outputs = [triton_grpc.InferRequestedOutput(name) for name in names]
    return inputs, outputs


def _parse_response(
    result: Any, model: ServedModel, frames: int, url: str, round_trip_ms: float
) -> _Response:
    probabilities = result.as_numpy(model.spec.output_name)
    expected = (frames, len(model.spec.labels))
    if probabilities is None or probabilities.shape != expected:
        raise QueryError(
            f"Triton at {url} returned output {model.spec.output_name!r} with shape "
            f"{None if probabilities is None else probabilities.shape}, expected "
            f"{expected}; check that the server's Python environment has numpy < 2."
        )
    saliency = result.as_numpy(SALIENCY_OUTPUT) if model.has_saliency else None
    infer_ms = None
    if model.has_compute_time:
        timing = result.as_numpy(COMPUTE_OUTPUT)
        infer_ms = None if timing is None else float(np.max(timing))
    return _Response(probabilities, saliency, infer_ms, round_trip_ms)


def _chunks(images: np.ndarray, max_batch_size: int) -> list[np.ndarray]:
    step = max_batch_size if max_batch_size > 0 else images.shape[0]
    return [images[i : i + step] for i in range(0, images.shape[0], step)]


def _merge(responses: list[_Response]) -> _Response:
    saliency = None
    if all(r.saliency is not None for r in responses):
        saliency = np.concatenate([r.saliency for r in responses], axis=0)
    infer = [r.infer_ms for r in responses]
    return _Response(
        probabilities=np.concatenate([r.probabilities for r in responses], axis=0),
        saliency=saliency,
        infer_ms=None if any(v is None for v in infer) else float(sum(infer)),
        round_trip_ms=sum(r.round_trip_ms for r in responses),
    )


def _negative_label(spec: ModelSpec) -> str:
    others = [label for label in spec.labels if label != spec.positive_label]
    return others[0] if others else "negative"


def _label(spec: ModelSpec, score: float) -> str:
    return spec.positive_label if score >= spec.threshold else _negative_label(spec)


def build_result(
    study: PreparedStudy,
    model: ServedModel,
    response: _Response,
    *,
    url: str,
    priority: int,
    emr: Mapping[str, Any] | None,
    started: float,
) -> QueryResult:
    """Turn per-frame model outputs into instance and study scores.

    Instance scores follow ``clinfer score``: the maximum positive-class probability
    over the instance's frames, labelled positive at or above the threshold.
    """
    spec = model.spec
    scores: list[InstanceScore] = []
    offset = 0
    for header, instance in zip(study.headers, study.instances):
        count = instance.frames.shape[0]
        probabilities = response.probabilities[offset : offset + count]
        offset += count
        positive = probabilities[:, spec.positive_index]
        best = int(np.argmax(positive))
        score = float(positive[best])
        scores.append(
            InstanceScore(
                path=header.path,
                sop_instance_uid=header.sop_instance_uid,
                series_instance_uid=header.series_instance_uid,
                num_frames=count,
                label=_label(spec, score),
                score=score,
                scores={n: float(v) for n, v in zip(spec.labels, probabilities[best])},
                frame_scores=[float(v) for v in positive],
                preprocessing=instance.settings,
            )
        )
    study_score = max(s.score for s in scores)
    if model.has_emr:
        emr_note = "EMR record sent as the model's 'emr' input."
    elif emr is not None:
        emr_note = f"EMR not used by this model: {spec.name} has no 'emr' input."
    else:
        emr_note = "No EMR record given."
    queue_ms = None
    if response.infer_ms is not None:
        queue_ms = max(response.round_trip_ms - response.infer_ms, 0.0)
    timing = QueryTiming(
        preprocess_ms=study.preprocess_ms,
        round_trip_ms=response.round_trip_ms,
        queue_ms=queue_ms,
        infer_ms=response.infer_ms,
        total_ms=(time.perf_counter() - started) * 1000.0,
    )
    return QueryResult(
        study_instance_uid=study.study_instance_uid,
        model_name=model.model_name or spec.name,
        triton_model=spec.name,
        model_version=spec.version,
        model_sha256=spec.sha256,
        model_training=spec.training_note,
        labels=spec.labels,
        threshold=spec.threshold,
        label=_label(spec, study_score),
        score=study_score,
        instances=scores,
        timing=timing,
        server_url=url,
        priority=priority,
        emr_used=model.has_emr,
        emr_note=emr_note,
        skipped=study.skipped,
        saliency=response.saliency,
    )


SERVER_ERRORS = (ServerUnavailableError, QueryError, ModelSpecError)


def _record_failure(
    errors: list[tuple[str, ClinferError]], model: str, url: str, exc: ClinferError
) -> None:
    logger.warning(
        "query of model %s failed on %s, trying the next URL: %s", model, url, exc
    )
    errors.append((url, exc))


def _hash_uid(uid: str) -> str:
    # Logs carry a SHA-256 prefix of a UID, never the UID itself.
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


def _observe(
    metrics: ClientQueryMetrics | None,
    priority: int,
    started: float,
    error: BaseException | None,
) -> None:
    if metrics is not None:
        metrics.observe(priority, time.perf_counter() - started, error)


def _is_unreachable(exc: InferenceServerException) -> bool:
    return str(exc.status()) in UNREACHABLE_STATUSES


def _normalise_urls(urls: str | Sequence[str]) -> list[str]:
    listed = [urls] if isinstance(urls, str) else list(urls)
    if not listed:
        raise QueryError("no Triton URL given; pass at least one HOST:PORT.")
    return listed


def _final_error(model: str, errors: list[tuple[str, ClinferError]]) -> ClinferError:
    detail = "; ".join(f"{url}: {exc}" for url, exc in errors)
    if all(isinstance(exc, ServerUnavailableError) for _, exc in errors):
        return ServerUnavailableError(
            f"no Triton server could be reached for model {model!r} ({detail}); start "
            "one with `clinfer serve` or pass a reachable --triton-url."
        )
    last = errors[-1][1]
    return type(last)(f"the query of model {model!r} failed on every server ({detail})")


def _translate(url: str, model: str, exc: InferenceServerException) -> ClinferError:
    if _is_unreachable(exc):
        return ServerUnavailableError(
            f"Triton at {url} is unreachable: {exc.message()}"
        )
    return QueryError(
        f"Triton at {url} rejected the query of model {model!r}: {exc.message()}; check "
        "the model name and version with the server's model repository."
    )


class _ClientBase:
    """Settings and per-server caches of the real-time clients."""

    _clients: dict[str, Any]

    def __init__(
        self,
        urls: str | Sequence[str],
        model: str = DEFAULT_MODEL,
        version: str | None = None,
        *,
        priority: int = REALTIME_PRIORITY,
        timeout_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.urls = _normalise_urls(urls)
        self.model = model
        self.version = version
        self.priority = priority
        self.timeout_s = timeout_s
        self.metrics = client_query_metrics(registry) if registry is not None else None
        self._clients = {}
        self._models: dict[str, ServedModel] = {}


class Client(_ClientBase):
    """Synchronous real-time client for one model on one or more Triton servers.

    Servers are tried in the given order. A server that is unreachable or rejects
    the request is logged and the next one is tried.

    Parameters
    ----------
    urls : str or sequence of str
        gRPC addresses ``HOST:PORT``.
    model : str
        Model name.
    version : str, optional
        Model version; the newest served version when None.
    priority : int
        Triton priority level; 1 is real time, 2 is batch.
    timeout_s : float
        Per-request gRPC deadline in seconds.
    registry : CollectorRegistry, optional
        Prometheus registry in which each query's latency is recorded by priority
        class and outcome (``clinfer_client_query_seconds``). None records nothing.
    """

    _clients: dict[str, triton_grpc.InferenceServerClient]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every gRPC channel of this client."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def _client(self, url: str) -> triton_grpc.InferenceServerClient:
        if url not in self._clients:
            self._clients[url] = triton_grpc.InferenceServerClient(url)
        return self._clients[url]

    def served_model(self, url: str) -> ServedModel:
        """Read the model's spec and tensor names from one server (cached).

        Raises
        ------
        ServerUnavailableError
            If the server cannot be reached.
        QueryError
            If the server does not serve the model.
        ModelSpecError
            If the model has no valid clinfer spec.
        """
        if url not in self._models:
            try:
                config, metadata = self._fetch(url, self.model, self.version)
            except InferenceServerException as exc:
                raise _translate(url, self.model, exc) from exc
            served = _served_model(config, metadata, self.version)
            realtime = _realtime_model_name(config)
            if realtime and self.priority == REALTIME_PRIORITY:
                try:
                    config, metadata = self._fetch(url, realtime, served.spec.version)
                except InferenceServerException as exc:
                    logger.warning(
                        "real-time model %s on %s failed (%s); using %s",
                        realtime,
                        url,
                        exc.message(),
                        self.model,
                    )
                else:
                    rt_served = _served_model(config, metadata, served.spec.version)
                    served = _use_realtime(served, rt_served, url)
            self._models[url] = served
        return self._models[url]

    def _fetch(
        self, url: str, model: str, version: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        client = self._client(url)
        metadata = client.get_model_metadata(
            model, version or "", as_json=True, client_timeout=self.timeout_s
        )
        config = client.get_model_config(
            model, version or "", as_json=True, client_timeout=self.timeout_s
        )
        return config["config"], metadata

    def query(
        self, paths: StrPath | Sequence[StrPath], *, emr: EmrSource | None = None
    ) -> QueryResult:
        """Preprocess one study and score it at this client's priority.

        Parameters
        ----------
        paths : str, os.PathLike or a sequence of them
            DICOM files or folders of one study.
        emr : Mapping, str or os.PathLike, optional
            An EMR record, or a JSON or CSV file holding it (see :func:`load_emr`).

        Returns
        -------
        QueryResult
            Scores, model identity, timings and the URL of the server that scored it.

        Raises
        ------
        DicomInputError
            If a file is not valid DICOM or not accepted by the model.
        ServerUnavailableError
            If no server could be reached.
        QueryError
            If every reachable server rejected the query, or the paths are not one
            study.
        """
        started = time.perf_counter()
        try:
            result = self._query(paths, emr, started)
        except Exception as exc:
            _observe(self.metrics, self.priority, started, exc)
            raise
        _observe(self.metrics, self.priority, started, None)
        return result

    def _query(
        self,
        paths: StrPath | Sequence[StrPath],
        emr: EmrSource | None,
        started: float,
    ) -> QueryResult:
        path_list = [paths] if isinstance(paths, str | PathLike) else list(paths)
        errors: list[tuple[str, ClinferError]] = []
        study: PreparedStudy | None = None
        record: dict[str, Any] | None = None
        for url in self.urls:
            try:
                model = self.served_model(url)
            except SERVER_ERRORS as exc:
                _record_failure(errors, self.model, url, exc)
                continue
            # Input errors are the caller's and are raised, not failed over.
            if study is None or study.size != (model.spec.height, model.spec.width):
                study = prepare_study(path_list, model.spec)
                record = load_emr(emr, study.headers[0])
            try:
                response = self._infer(url, model, study, record)
            except EmrInputError:
                raise
            except SERVER_ERRORS as exc:
                _record_failure(errors, self.model, url, exc)
                continue
            result = build_result(
                study,
                model,
                response,
                url=url,
                priority=self.priority,
                emr=record,
                started=started,
            )
            logger.info(
                "study %s scored by %s:%s on %s in %.1f ms",
                _hash_uid(study.study_instance_uid),
                model.spec.name,
                model.spec.version,
                url,
                result.timing.total_ms,
            )
            return result
        raise _final_error(self.model, errors)

    def _infer(
        self,
        url: str,
        model: ServedModel,
        study: PreparedStudy,
        emr: Mapping[str, Any] | None,
    ) -> _Response:
        client = self._client(url)
        responses = []
        for images in _chunks(study.images, model.spec.max_batch_size):
            inputs, outputs = _build_inputs(model, images, emr)
            sent = time.perf_counter()
            try:
                result = client.infer(
                    model.spec.name,
                    inputs,
                    model_version=model.spec.version,
                    outputs=outputs,
                    priority=self.priority,
                    # A composition copies this parameter onto the requests it sends
                    # to its composing models (see clinfer.export.composition).
                    parameters={"clinfer_priority": self.priority},
                    client_timeout=self.timeout_s,
                )
            except InferenceServerException as exc:
                raise _translate(url, self.model, exc) from exc
            elapsed = (time.perf_counter() - sent) * 1000.0
            responses.append(
                _parse_response(result, model, images.shape[0], url, elapsed)
            )
        return _merge(responses)


class AsyncClient(_ClientBase):
    """asyncio real-time client; the same contract as :class:`Client`.

    File reading and preprocessing run in a worker thread (``asyncio.to_thread``) so
    the event loop stays free while a study is decoded.
    """

    _clients: dict[str, triton_aio.InferenceServerClient]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every gRPC channel of this client."""
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def _client(self, url: str) -> triton_aio.InferenceServerClient:
        if url not in self._clients:
            self._clients[url] = triton_aio.InferenceServerClient(url)
        return self._clients[url]

    async def served_model(self, url: str) -> ServedModel:
        """Read the model's spec and tensor names from one server (cached).

        Raises
        ------
        ServerUnavailableError, QueryError, ModelSpecError
            As :meth:`Client.served_model`.
        """
        if url not in self._models:
            try:
                config, metadata = await self._fetch(url, self.model, self.version)
            except InferenceServerException as exc:
                raise _translate(url, self.model, exc) from exc
            served = _served_model(config, metadata, self.version)
            realtime = _realtime_model_name(config)
            if realtime and self.priority == REALTIME_PRIORITY:
                try:
                    config, metadata = await self._fetch(
                        url, realtime, served.spec.version
                    )
                except InferenceServerException as exc:
                    logger.warning(
                        "real-time model %s on %s failed (%s); using %s",
                        realtime,
                        url,
                        exc.message(),
                        self.model,
                    )
                else:
                    rt_served = _served_model(config, metadata, served.spec.version)
                    served = _use_realtime(served, rt_served, url)
            self._models[url] = served
        return self._models[url]

    async def _fetch(
        self, url: str, model: str, version: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        client = self._client(url)
        metadata = await client.get_model_metadata(
            model, version or "", as_json=True, client_timeout=self.timeout_s
        )
        config = await client.get_model_config(
            model, version or "", as_json=True, client_timeout=self.timeout_s
        )
        return config["config"], metadata

    async def query(
        self, paths: StrPath | Sequence[StrPath], *, emr: EmrSource | None = None
    ) -> QueryResult:
        """Preprocess one study and score it; see :meth:`Client.query`.

        Raises
        ------
        DicomInputError, ServerUnavailableError, QueryError
            As :meth:`Client.query`.
        """
        started = time.perf_counter()
        try:
            result = await self._query(paths, emr, started)
        except Exception as exc:
            _observe(self.metrics, self.priority, started, exc)
            raise
        _observe(self.metrics, self.priority, started, None)
        return result

    async def _query(
        self,
        paths: StrPath | Sequence[StrPath],
        emr: EmrSource | None,
        started: float,
    ) -> QueryResult:
        path_list = [paths] if isinstance(paths, str | PathLike) else list(paths)
        errors: list[tuple[str, ClinferError]] = []
        study: PreparedStudy | None = None
        record: dict[str, Any] | None = None
        for url in self.urls:
            try:
                model = await self.served_model(url)
            except SERVER_ERRORS as exc:
                _record_failure(errors, self.model, url, exc)
                continue
            # Input errors are the caller's and are raised, not failed over.
            if study is None or study.size != (model.spec.height, model.spec.width):
                study = await asyncio.to_thread(prepare_study, path_list, model.spec)
                record = load_emr(emr, study.headers[0])
            try:
                response = await self._infer(url, model, study, record)
            except EmrInputError:
                raise
            except SERVER_ERRORS as exc:
                _record_failure(errors, self.model, url, exc)
                continue
            return build_result(
                study,
                model,
                response,
                url=url,
                priority=self.priority,
                emr=record,
                started=started,
            )
        raise _final_error(self.model, errors)

    async def _infer(
        self,
        url: str,
        model: ServedModel,
        study: PreparedStudy,
        emr: Mapping[str, Any] | None,
    ) -> _Response:
        client = self._client(url)
        responses = []
        for images in _chunks(study.images, model.spec.max_batch_size):
            inputs, outputs = _build_inputs(model, images, emr)
            sent = time.perf_counter()
            try:
                result = await client.infer(
                    model.spec.name,
                    inputs,
                    model_version=model.spec.version,
                    outputs=outputs,
                    priority=self.priority,
                    # A composition copies this parameter onto the requests it sends
                    # to its composing models (see clinfer.export.composition).
                    parameters={"clinfer_priority": self.priority},
                    client_timeout=self.timeout_s,
                )
            except InferenceServerException as exc:
                raise _translate(url, self.model, exc) from exc
            elapsed = (time.perf_counter() - sent) * 1000.0
            responses.append(
                _parse_response(result, model, images.shape[0], url, elapsed)
            )
        return _merge(responses)
