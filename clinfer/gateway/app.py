"""FastAPI gateway: authenticated real-time study queries, heatmaps and health."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydicom
import tritonclient.grpc as triton_grpc
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.routing import Match
from starlette.types import Scope
from tritonclient.utils import InferenceServerException

from clinfer.client.query import Client, QueryResult
from clinfer.errors import (
    ClinferError,
    DicomInputError,
    ModelSpecError,
    QueryError,
    ServerUnavailableError,
)
from clinfer.gateway import images
from clinfer.gateway.audit import AuditEntry, AuditLog
from clinfer.gateway.auth import QUERY_SCOPE, TokenEntry, hash_token, load_tokens
from clinfer.gateway.store import RESULTS_FILE, ResultStore, StoredResult
from clinfer.metrics import GatewayMetrics
from clinfer.privacy import short_hash
from clinfer.train.emr import EMR_COLUMNS, EmrValueError, model_inputs
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DISCLAIMER = "Not for diagnostic use without review by a qualified clinician."
NO_VALIDATION = "no validation report for this model"
QUERY_ROUTE = "/v1/studies/query"
REFERENCE_ROUTE = "/v1/studies/query-by-reference"
METRICS_ROUTE = "/metrics"


@dataclass
class GatewaySettings:
    """Configuration of one gateway process.

    ``max_request_bytes`` is checked against the Content-Length header before the
    body is read, and against the summed size of the uploaded files after.
    """

    triton_urls: Sequence[str]
    tokens_file: Path
    audit_log: Path
    storage_root: Path | None = None
    model: str = "cxr_resnet"
    model_version: str | None = None
    validation_dir: Path | None = None
    """Folder with ``<model>/report.json`` files written by ``clinfer validate``."""
    max_request_bytes: int = 64 * 1024 * 1024
    max_files: int = 32
    max_results: int = 1000
    """Results kept for the result, heatmap and image routes, oldest deleted."""
    state_dir: Path | None = None
    """Folder of the results database (``results.sqlite``); None keeps results in
    memory only, so a restarted gateway no longer serves them."""
    timeout_s: float = 30.0


# Served models whose scores come from another validated model: the multimodal
# composition reports the fusion model's probabilities, so the page shows the fusion
# model's validation report for it.
VALIDATED_AS: dict[str, tuple[str, ...]] = {"multimodal": ("fusion",)}


class ReferenceQuery(BaseModel):
    """Body of a query by reference: a path under the storage root."""

    path: str
    emr: dict[str, Any] | None = None


# Routes check the token themselves so that a rejected request is audited too.
_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
_Prepared = tuple[TokenEntry, list[Path], dict[str, str], dict[str, Any] | None]


class _GatewayError(Exception):
    def __init__(self, status: int, detail: Any, outcome: str) -> None:
        super().__init__(str(detail))
        self.status = status
        self.detail = detail
        self.outcome = outcome


class _Gateway:
    """State shared by the routes: client, tokens, audit log, results and metrics."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.tokens = load_tokens(settings.tokens_file)
        self.audit = AuditLog(settings.audit_log)
        self.registry = CollectorRegistry()
        self.client = Client(
            list(settings.triton_urls),
            settings.model,
            settings.model_version,
            timeout_s=settings.timeout_s,
            registry=self.registry,
        )
        state = settings.state_dir
        self.results = ResultStore(
            state / RESULTS_FILE if state is not None else None, settings.max_results
        )

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> TokenEntry:
        if credentials is None or not credentials.credentials:
            raise _GatewayError(401, "missing bearer token", "unauthenticated")
        entry = self.tokens.get(hash_token(credentials.credentials))
        if entry is None:
            raise _GatewayError(401, "invalid bearer token", "unauthenticated")
        if QUERY_SCOPE not in entry.scopes:
            raise _GatewayError(
                403,
                f"user {entry.user!r} lacks the {QUERY_SCOPE!r} scope",
                "forbidden",
            )
        return entry

    def validation_summary(self, model: str) -> dict[str, Any] | None:
        if self.settings.validation_dir is None:
            return None
        data = None
        for name in (model, *VALIDATED_AS.get(model, ())):
            path = self.settings.validation_dir / name / "report.json"
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            break
        if data is None:
            return None
        test = data.get("test", {})
        point = test.get("operating_point", {})
        return {
            "decision": data.get("decision", {}).get("overall"),
            "threshold": data.get("threshold", {}).get("value"),
            "test_sensitivity": point.get("sensitivity"),
            "test_specificity": point.get("specificity"),
            "test_n": test.get("n"),
            "test_auroc": test.get("auroc", {}).get("auroc"),
            "test_auroc_ci": [
                test.get("auroc", {}).get("ci_lower"),
                test.get("auroc", {}).get("ci_upper"),
            ],
            "synthetic_data": data.get("data", {}).get("synthetic"),
        }


def _study_uid(paths: Sequence[Path]) -> str | None:
    for path in paths:
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            )
        except Exception:  # noqa: BLE001 - any unreadable file has no UID to audit
            continue
        uid = getattr(ds, "StudyInstanceUID", None)
        if uid:
            return str(uid)
    return None


def parse_emr(text: str | None) -> dict[str, Any] | None:
    """Parse an EMR JSON object whose values are numbers or numeric strings.

    Raises
    ------
    QueryError
        If the text is not a JSON object or a field is not numeric. The message
        names the field.
    """
    if text is None or not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(
            f"EMR is not valid JSON: {exc.msg} at position {exc.pos}"
        ) from exc
    if not isinstance(record, dict):
        raise QueryError(f"EMR must be one JSON object, got {type(record).__name__}")
    return record


def _check_emr_fields(record: dict[str, Any], features: Sequence[str]) -> None:
    for name in features:
        if name not in record:
            raise QueryError(
                f"EMR field {name!r} is missing; the model needs {list(features)}"
            )
        value = record[name]
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise QueryError(
                f"EMR field {name!r} has value {value!r}, which is not a number"
            ) from exc
        if not math.isfinite(number) or isinstance(value, bool):
            raise QueryError(f"EMR field {name!r} must be a finite number")


def _derive_emr(record: dict[str, Any], features: Sequence[str]) -> dict[str, Any]:
    """Return the model inputs of a record given as raw EMR CSV columns.

    A record with a model input that is not also a raw column (such as
    ``sex_male``) is taken as model inputs and returned unchanged.

    Raises
    ------
    _GatewayError
        422 naming the field, if a raw value is missing or invalid.
    """
    derived_only = set(features) - set(EMR_COLUMNS)
    if derived_only & set(record):
        return record
    try:
        return dict(model_inputs(record))
    except EmrValueError as exc:
        raise _GatewayError(
            422,
            {"field": exc.column, "message": f"invalid EMR: {exc}"},
            "invalid_emr",
        ) from exc


def _emr_field(message: str) -> str | None:
    match = re.search(r"EMR field '([^']+)'", message)
    return match.group(1) if match else None


def _result_json(
    gateway: _Gateway,
    result: QueryResult,
    record: dict[str, Any] | None,
    result_id: str,
) -> dict[str, Any]:
    data = result.to_dict()
    data.pop("saliency", None)
    # File paths are temporary upload files or paths under the storage root.
    for instance in data["instances"]:
        instance["path"] = Path(instance["path"]).name
    for skipped in data["skipped"]:
        skipped["path"] = Path(skipped["path"]).name
    data.pop("study_instance_uid", None)
    data["study"] = short_hash(result.study_instance_uid)
    data["result_id"] = result_id
    positive = gateway.client.served_model(result.server_url).spec.positive_label
    data["positive_label"] = positive
    data["label_text"] = (
        f"{result.label} (score {result.score:.3f}; scores at or above "
        f"{result.threshold:.3f} are labelled {positive})"
    )
    data["emr_values"] = record if result.emr_used else None
    data["has_heatmap"] = result.saliency is not None
    data["validation"] = gateway.validation_summary(result.model_name)
    data["validation_note"] = None if data["validation"] else NO_VALIDATION
    data["disclaimer"] = DISCLAIMER
    data["image_url"] = f"/v1/results/{result_id}/image.png"
    data["heatmap_url"] = (
        f"/v1/results/{result_id}/heatmap.png" if data["has_heatmap"] else None
    )
    return data


def _render(
    gateway: _Gateway, result: QueryResult
) -> tuple[bytes | None, bytes | None]:
    first = result.instances[0]
    served = gateway.client.served_model(result.server_url)
    config = PreprocessConfig(height=served.spec.height, width=served.spec.width)
    try:
        frame = load_and_preprocess(first.path, config).frames[0]
    except (DicomInputError, OSError) as exc:
        logger.warning("cannot render the frame of result: %s", type(exc).__name__)
        return None, None
    heatmap = None
    if result.saliency is not None:
        heatmap = images.overlay_png(frame, result.saliency[0])
    return images.frame_png(frame), heatmap


def _route_template(app: FastAPI, scope: Scope) -> str | None:
    """Return the path template of the route that matches ``scope``, if any."""
    partial = None
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", None)
        if match == Match.PARTIAL and partial is None:
            partial = getattr(route, "path", None)
    return partial


def _run_query(
    gateway: _Gateway,
    paths: list[Path],
    names: dict[str, str],
    record: dict[str, Any] | None,
) -> tuple[QueryResult, dict[str, Any]]:
    try:
        served = gateway.client.served_model(gateway.client.urls[0])
    except ClinferError:
        served = None
    if served is not None and served.has_emr:
        if record is None:
            raise _GatewayError(
                422,
                {
                    "field": "emr",
                    "message": f"model {served.spec.name!r} needs an EMR record",
                },
                "invalid_emr",
            )
        record = _derive_emr(record, served.emr_features)
        try:
            _check_emr_fields(record, served.emr_features)
        except QueryError as exc:
            raise _GatewayError(
                422, {"field": _emr_field(str(exc)), "message": str(exc)}, "invalid_emr"
            ) from exc
    try:
        result = gateway.client.query(paths, emr=record)
    except DicomInputError as exc:
        message = str(exc)
        file_name = None
        for temp, original in names.items():
            if temp in message:
                message = message.replace(temp, original)
                file_name = original
        raise _GatewayError(
            422,
            {"file": file_name, "reason": exc.reason, "message": message},
            "invalid_dicom",
        ) from exc
    except ServerUnavailableError as exc:
        raise _GatewayError(503, str(exc), "server_unavailable") from exc
    except QueryError as exc:
        message = str(exc)
        for temp, original in names.items():
            message = message.replace(temp, original)
        field_name = _emr_field(message)
        if field_name or "EMR" in message:
            raise _GatewayError(
                422, {"field": field_name, "message": message}, "invalid_emr"
            ) from exc
        raise _GatewayError(422, message, "invalid_query") from exc
    except ModelSpecError as exc:
        raise _GatewayError(502, str(exc), "model_error") from exc
    return result, record or {}


def _ready(settings: GatewaySettings) -> tuple[bool, list[dict[str, Any]]]:
    checks = []
    for url in settings.triton_urls:
        client = triton_grpc.InferenceServerClient(url)
        try:
            server = client.is_server_ready(client_timeout=2.0)
            model = server and client.is_model_ready(
                settings.model, settings.model_version or "", client_timeout=2.0
            )
        except InferenceServerException:
            server, model = False, False
        finally:
            client.close()
        checks.append(
            {"url": url, "server_ready": bool(server), "model_ready": bool(model)}
        )
    return any(c["model_ready"] for c in checks), checks


def create_app(settings: GatewaySettings) -> FastAPI:
    """Build the gateway application.

    Parameters
    ----------
    settings : GatewaySettings
        Triton URLs, model, tokens file, audit log and limits.

    Returns
    -------
    FastAPI
        The application, with the web page at ``/`` and the API under ``/v1``.

    Raises
    ------
    ConfigurationError
        If the tokens file is invalid or the audit log folder cannot be created.
    """
    gateway = _Gateway(settings)
    app = FastAPI(
        title="clinfer gateway",
        version="0.1.0",
        description=f"Real-time scoring of DICOM studies. {DISCLAIMER}",
    )
    app.state.gateway = gateway

    @app.middleware("http")
    async def limit_request_size(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if (
            length is not None
            and length.isdigit()
            and int(length) > settings.max_request_bytes
        ):
            if request.url.path in (QUERY_ROUTE, REFERENCE_ROUTE):
                gateway.audit.append(
                    AuditEntry(
                        None, request.url.path, None, None, None, "too_large", 413
                    )
                )
            logger.info("rejected a %s-byte request to %s", length, request.url.path)
            return JSONResponse(
                {
                    "detail": f"request body of {length} bytes exceeds the limit of "
                    f"{settings.max_request_bytes} bytes; send fewer or smaller files"
                },
                status_code=413,
            )
        # NOTE: a chunked body without Content-Length is read in full before the
        # summed file size is checked in the route.
        return await call_next(request)

    def finish(
        route: str, action: Callable[[dict[str, Any]], _Prepared]
    ) -> JSONResponse:
        # ``context`` collects the user and hashed study as they become known, so
        # that the audit entry of a failed request names them too.
        context: dict[str, Any] = {"user": None, "study": None}
        try:
            entry, paths, names, record = action(context)
            uid = _study_uid(paths)
            context["study"] = short_hash(uid) if uid else None
            result, used = _run_query(gateway, paths, names, record)
            result_id = secrets.token_hex(12)
            frame_png, heatmap_png = _render(gateway, result)
            body = _result_json(gateway, result, used, result_id)
            gateway.results.add(result_id, StoredResult(body, frame_png, heatmap_png))
        except _GatewayError as exc:
            gateway.audit.append(
                AuditEntry(
                    context["user"],
                    route,
                    context["study"],
                    settings.model,
                    settings.model_version,
                    exc.outcome,
                    exc.status,
                )
            )
            logger.info(
                "%s rejected with %d (%s) for study %s",
                route,
                exc.status,
                exc.outcome,
                context["study"],
            )
            return JSONResponse({"detail": exc.detail}, status_code=exc.status)
        gateway.audit.append(
            AuditEntry(
                entry.user,
                route,
                context["study"],
                result.model_name,
                result.model_version,
                "scored",
                200,
                result_id,
            )
        )
        logger.info(
            "study %s scored by %s:%s as result %s",
            context["study"],
            result.model_name,
            result.model_version,
            result_id,
        )
        return JSONResponse(body)

    @app.post(QUERY_ROUTE)
    def query_upload(
        credentials: Credentials,
        files: Annotated[
            list[UploadFile], File(description="DICOM files of one study")
        ],
        emr: Annotated[
            str | None, Form(description="EMR record as a JSON object")
        ] = None,
    ) -> JSONResponse:
        """Score the uploaded DICOM files of one study."""
        with tempfile.TemporaryDirectory(prefix="clinfer-gateway-") as folder:

            def action(context: dict[str, Any]) -> _Prepared:
                entry = gateway.authorize(credentials)
                context["user"] = entry.user
                if len(files) > settings.max_files:
                    raise _GatewayError(
                        413,
                        f"{len(files)} files exceed the limit of {settings.max_files} per query",
                        "too_many_files",
                    )
                paths, names, total = [], {}, 0
                for index, upload in enumerate(files):
                    original = Path(upload.filename or f"file{index}").name
                    # One folder per upload keeps the client's file name, so that
                    # results and error messages name the file the user picked.
                    safe = re.sub(r"[^A-Za-z0-9._-]", "_", original)
                    path = Path(folder) / f"{index:03d}" / safe
                    path.parent.mkdir()
                    data = upload.file.read()
                    total += len(data)
                    if total > settings.max_request_bytes:
                        raise _GatewayError(
                            413, "uploaded files exceed the size limit", "too_large"
                        )
                    path.write_bytes(data)
                    paths.append(path)
                    names[str(path)] = original
                try:
                    record = parse_emr(emr)
                except QueryError as exc:
                    raise _GatewayError(
                        422, {"field": "emr", "message": str(exc)}, "invalid_emr"
                    ) from exc
                return entry, paths, names, record

            return finish(QUERY_ROUTE, action)

    @app.post(REFERENCE_ROUTE)
    def query_reference(credentials: Credentials, body: ReferenceQuery) -> JSONResponse:
        """Score the study at a path under the gateway's storage root."""

        def action(context: dict[str, Any]) -> _Prepared:
            entry = gateway.authorize(credentials)
            context["user"] = entry.user
            if settings.storage_root is None:
                raise _GatewayError(
                    404, "this gateway has no storage root", "no_storage"
                )
            root = settings.storage_root.resolve()
            relative = Path(body.path)
            target = (root / relative).resolve()
            if relative.is_absolute() or not target.is_relative_to(root):
                raise _GatewayError(
                    400,
                    f"path {body.path!r} is outside the storage root; pass a relative path",
                    "path_rejected",
                )
            if not target.exists():
                raise _GatewayError(
                    404,
                    f"path {body.path!r} not found under the storage root",
                    "not_found",
                )
            return entry, [target], {str(root) + "/": ""}, body.emr

        return finish(REFERENCE_ROUTE, action)

    def stored(
        credentials: HTTPAuthorizationCredentials | None, result_id: str
    ) -> StoredResult:
        try:
            gateway.authorize(credentials)
        except _GatewayError as exc:
            raise HTTPException(exc.status, exc.detail) from exc
        result = gateway.results.get(result_id)
        if result is None:
            raise HTTPException(
                404,
                f"result {result_id} not found; the gateway keeps the newest "
                f"{settings.max_results} results",
            )
        return result

    @app.get("/v1/results/{result_id}")
    def result_body(credentials: Credentials, result_id: str) -> JSONResponse:
        """Return the response body of an earlier query by its result id."""
        return JSONResponse(stored(credentials, result_id).body)

    @app.get("/v1/results/{result_id}/heatmap.png")
    def heatmap(credentials: Credentials, result_id: str) -> Response:
        """Return the saliency overlay of the result's first frame as PNG."""
        result = stored(credentials, result_id)
        if result.heatmap_png is None:
            raise HTTPException(404, "the model of this result has no saliency output")
        return Response(result.heatmap_png, media_type="image/png")

    @app.get("/v1/results/{result_id}/image.png")
    def image(credentials: Credentials, result_id: str) -> Response:
        """Return the result's first preprocessed frame as PNG."""
        result = stored(credentials, result_id)
        if result.frame_png is None:
            raise HTTPException(404, "no rendered frame for this result")
        return Response(result.frame_png, media_type="image/png")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Return 200 while the process runs."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Return 200 when a Triton server and the model are ready, else 503."""
        ok, checks = _ready(settings)
        return JSONResponse(
            {"ready": ok, "servers": checks}, status_code=200 if ok else 503
        )

    # NOTE: /metrics needs no token, so that Prometheus can scrape it. Its labels
    # carry no ids, but bind the gateway to loopback or a private network.
    @app.get(METRICS_ROUTE, include_in_schema=False)
    def metrics_text() -> Response:
        """Return the gateway's and its client's metrics in Prometheus text format."""
        return Response(
            generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Labels are route templates, so ids in paths never reach Prometheus.
    routes = [r.path for r in app.router.routes if hasattr(r, "path")]
    metrics = GatewayMetrics(gateway.registry, routes)

    # Added last, so it is the outermost middleware and times rejected bodies too.
    @app.middleware("http")
    async def record_metrics(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
        finally:
            metrics.observe(
                _route_template(app, request.scope),
                gateway.client.priority,
                time.perf_counter() - started,
                status,
            )
        return response

    return app
