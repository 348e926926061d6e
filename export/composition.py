"""The served multimodal composition: publishing and a priority-carrying client call.

``multimodal`` is a Python-backend BLS model (``triton_multimodal_model.py``) that
calls ``cxr_cnn``, ``emr_mlp`` and ``fusion`` at the versions recorded in its
``composition.json``. Triton 2.51's Python backend neither exposes a request's
priority to Python nor lets a BLS request set one. ``infer_multimodal`` therefore
sends the priority twice. The request priority orders the composition's own queue,
and the request parameter ``clinfer_priority`` is copied by the composition onto
every composing request. Every served Python model counts requests by that priority in
``clinfer_requests_by_priority_total{model, priority}`` on the metrics endpoint.

Because those composing requests are queued at the composing models' default level
and on the instances that run batch work, a real-time request would still wait for
running batch executions. With ``ServingOptions.realtime_models`` (the default) the
composition and each model it calls get a ``_realtime`` copy on their own instances
(``clinfer.export.served_repository.publish_realtime_copy``). ``multimodal``'s config
parameter ``clinfer_realtime_model`` names ``multimodal_realtime``, where
``clinfer.client.Client`` sends priority-1 queries. That copy calls
``cxr_cnn_realtime``, ``emr_mlp_realtime`` and ``fusion_realtime``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from clinfer.export.repository import (
    BATCH_PRIORITY,
    REALTIME_MODEL_PARAMETER,
    REALTIME_SUFFIX,
)
from clinfer.export.served_repository import (
    ServingOptions,
    publish_model,
    publish_realtime_copy,
    realtime_name,
    remove_realtime_copy,
)
from tritonclient.utils import InferenceServerException

from clinfer.errors import InferenceError
from clinfer.train.emr import EMR_FEATURES
from clinfer.train.training import (
    EMR_MODEL,
    FUSION_MODEL,
    IMAGE_MODEL,
    IMAGE_SIZE,
)

logger = logging.getLogger(__name__)

COMPOSITION_NAME = "multimodal"
COMPOSITION_SOURCE = Path(__file__).with_name("triton_multimodal_model.py")
PRIORITY_PARAMETER = "clinfer_priority"
PRIORITY_METRIC = "clinfer_requests_by_priority_total"
# Config parameter of the real-time composition: appended to every composing model's
# name by triton_multimodal_model.py.
STEP_SUFFIX_PARAMETER = "clinfer_step_suffix"
COMPOSING_MODELS = (IMAGE_MODEL, EMR_MODEL, FUSION_MODEL)
OUTPUT_NAMES = (
    "fusion_probabilities",
    "image_probabilities",
    "emr_probabilities",
    "saliency",
)


def composition_steps(versions: Mapping[str, int]) -> list[dict[str, Any]]:
    """Return the BLS calls: model, pinned version, inputs and output renames."""
    return [
        {
            "model": IMAGE_MODEL,
            "version": versions[IMAGE_MODEL],
            "inputs": ["image"],
            "outputs": {
                "probabilities": "image_probabilities",
                "saliency": "saliency",
            },
        },
        {
            "model": EMR_MODEL,
            "version": versions[EMR_MODEL],
            "inputs": ["emr"],
            "outputs": {"probabilities": "emr_probabilities"},
        },
        {
            "model": FUSION_MODEL,
            "version": versions[FUSION_MODEL],
            "inputs": ["image", "emr"],
            "outputs": {"probabilities": "fusion_probabilities"},
        },
    ]


def composition_spec(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Return the clinfer spec of the composition from its composing models' specs."""
    image, emr, fusion = (
        specs[name] for name in (IMAGE_MODEL, EMR_MODEL, FUSION_MODEL)
    )
    saliency = next(o for o in image["outputs"] if o["name"] == "saliency")
    return {
        "schema": 1,
        "name": COMPOSITION_NAME,
        "task": "synthetic cohort label from the chest radiograph and the EMR, with "
        "the image-only and EMR-only scores and an image saliency map",
        "labels": list(fusion["labels"]),
        "positive_label": fusion["positive_label"],
        "threshold": fusion["threshold"],
        "inputs": list(fusion["inputs"]),
        # Order of the values of the ``emr`` input, for clients that build it.
        "emr": {"features": list(EMR_FEATURES)},
        "outputs": [
            {
                "name": "fusion_probabilities",
                "dims": [2],
                "labels": True,
                "description": f"{FUSION_MODEL} softmax (negative, positive)",
            },
            {
                "name": "image_probabilities",
                "dims": [2],
                "labels": True,
                "description": f"{IMAGE_MODEL} softmax (negative, positive)",
            },
            {
                "name": "emr_probabilities",
                "dims": [2],
                "labels": True,
                "description": f"{EMR_MODEL} softmax (negative, positive)",
            },
            {**saliency, "description": f"{IMAGE_MODEL}: {saliency['description']}"},
        ],
        "priority": {
            "parameter": PRIORITY_PARAMETER,
            "metric": PRIORITY_METRIC,
            "rule": "send the priority as the request priority and as the request "
            f"parameter {PRIORITY_PARAMETER}; the composition sets "
            f"{PRIORITY_PARAMETER} on every composing request",
        },
        "training": {
            name: specs[name]["training"]
            for name in (IMAGE_MODEL, EMR_MODEL, FUSION_MODEL)
        },
    }


def realtime_parameters(name: str, options: ServingOptions) -> dict[str, str]:
    """Return the config parameter naming ``name``'s real-time copy, if it has one."""
    if not options.realtime_models:
        return {}
    return {REALTIME_MODEL_PARAMETER: realtime_name(name)}


def publish_composing_model(
    repository: Path,
    spec: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    version_info: Mapping[str, Any],
    options: ServingOptions | None = None,
) -> tuple[int, bool]:
    """Publish a model that the composition calls, and its real-time copy.

    With ``options.realtime_models`` the batch config names ``<name>_realtime``
    and the copy is mirrored at the same versions. Without it, a copy left by an
    earlier publish is deleted, so no copy keeps serving superseded versions.

    Returns
    -------
    (version, created)
        Of the batch model; the copy has the same version.

    Raises
    ------
    clinfer.errors.ExportError
        If a version folder or the copy cannot be written.
    """
    options = options or ServingOptions()
    result = publish_model(
        repository,
        spec,
        files,
        version_info=version_info,
        options=options,
        parameters=realtime_parameters(spec["name"], options),
    )
    if options.realtime_models:
        publish_realtime_copy(repository, spec["name"], options=options)
    else:
        remove_realtime_copy(repository, spec["name"])
    return result


def publish_composition(
    repository: Path,
    specs: Mapping[str, Mapping[str, Any]],
    versions: Mapping[str, int],
    options: ServingOptions | None = None,
) -> tuple[int, bool]:
    """Publish the BLS composition pinned to ``versions`` of its composing models.

    A new version is published when the BLS source or a pinned version changes.
    The composition has no warmup, because Triton may load it before the models
    it calls. With ``options.realtime_models`` the same version is mirrored into
    ``multimodal_realtime``, which calls the composing models' real-time copies
    (publish those first with ``publish_composing_model``).

    Returns
    -------
    (version, created)
        Of ``multimodal``; ``multimodal_realtime`` has the same version.

    Raises
    ------
    clinfer.errors.ExportError
        If the version folder or the real-time copy cannot be written.
    """
    options = options or ServingOptions()
    steps = composition_steps(versions)
    files = {
        "model.py": COMPOSITION_SOURCE.read_bytes(),
        "composition.json": json.dumps({"steps": steps}, indent=2).encode(),
    }
    result = publish_model(
        repository,
        composition_spec(specs),
        files,
        version_info={"steps": steps},
        backends=("python",),
        options=options,
        warmup=False,
        parameters=realtime_parameters(COMPOSITION_NAME, options),
    )
    if options.realtime_models:
        publish_realtime_copy(
            repository,
            COMPOSITION_NAME,
            backends=("python",),
            options=options,
            warmup=False,
            parameters={STEP_SUFFIX_PARAMETER: REALTIME_SUFFIX},
        )
    else:
        remove_realtime_copy(repository, COMPOSITION_NAME)
    return result


@dataclass(frozen=True)
class MultimodalResult:
    """Outputs of one ``infer_multimodal`` call, batch axis first."""

    fusion_probabilities: np.ndarray
    image_probabilities: np.ndarray
    emr_probabilities: np.ndarray
    saliency: np.ndarray


def infer_multimodal(
    client: triton_grpc.InferenceServerClient,
    image: np.ndarray,
    emr: np.ndarray,
    *,
    priority: int = BATCH_PRIORITY,
    model_name: str = COMPOSITION_NAME,
    timeout_s: float = 60.0,
) -> MultimodalResult:
    """Run the composition on a batch, carrying ``priority`` to every composing model.

    ``image`` is (N, 1, 224, 224) float32 from ``load_and_preprocess`` and ``emr``
    (N, features) raw values.

    Raises
    ------
    InferenceError
        If Triton rejects or fails the request.
    ValueError
        If the shapes do not match or ``priority`` is not 1 or 2.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    emr = np.ascontiguousarray(emr, dtype=np.float32)
    if image.ndim != 4 or image.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image must be (N, 1, 224, 224), got {image.shape}")
    if emr.ndim != 2 or len(emr) != len(image):
        raise ValueError(
            f"emr must be (N, features) with N={len(image)}, got {emr.shape}"
        )
    if priority not in (1, 2):
        raise ValueError(f"priority must be 1 (real-time) or 2 (batch), got {priority}")
    inputs = []
    for name, array in (("image", image), ("emr", emr)):
        tensor = triton_grpc.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [triton_grpc.InferRequestedOutput(name) for name in OUTPUT_NAMES]
    try:
        response = client.infer(
            model_name,
            inputs,
            outputs=outputs,
            priority=priority,
            parameters={PRIORITY_PARAMETER: priority},
            client_timeout=timeout_s,
        )
    except InferenceServerException as exc:
        raise InferenceError(
            f"model {model_name!r} failed at priority {priority}: {exc.message()}; "
            "check that the repository was published with `clinfer export-trained`"
        ) from exc
    return MultimodalResult(*(response.as_numpy(name) for name in OUTPUT_NAMES))


def priority_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """Parse ``clinfer_requests_by_priority_total`` into {(model, priority): count}."""
    counts = {}
    for line in metrics_text.splitlines():
        if not line.startswith(PRIORITY_METRIC + "{"):
            continue
        labels_text, _, value = line[len(PRIORITY_METRIC) + 1 :].rpartition("} ")
        labels = dict(
            part.split("=", 1) for part in labels_text.split(",") if "=" in part
        )
        key = (
            labels.get("model", "").strip('"'),
            labels.get("priority", "").strip('"'),
        )
        counts[key] = float(value)
    return counts
