"""gRPC access to clinfer models on Triton, with errors translated to clinfer's own."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from clinfer.errors import (
    InferenceError,
    ModelSpecError,
    ServerError,
    ServerNotReadyError,
)

logger = logging.getLogger(__name__)

SPEC_PARAMETER = "clinfer_spec"


@dataclass(frozen=True)
class ModelSpec:
    """What a served clinfer model expects and returns, read from its Triton config."""

    name: str
    version: str
    sha256: str
    labels: tuple[str, ...]
    positive_label: str
    threshold: float
    input_name: str
    channels: int
    height: int
    width: int
    output_name: str
    accepts: dict[str, Any]
    training: dict[str, Any]
    max_batch_size: int

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @classmethod
    def from_config(cls, config: dict[str, Any], version: str) -> ModelSpec:
        """Build a spec from Triton's JSON model config and a served version.

        Raises
        ------
        ModelSpecError
            If the config has no ``clinfer_spec`` parameter or it lacks a field.
        """
        name = config.get("name", "?")
        raw = config.get("parameters", {}).get(SPEC_PARAMETER, {}).get("string_value")
        if not raw:
            raise ModelSpecError(
                f"model {name!r} has no {SPEC_PARAMETER!r} parameter in its config.pbtxt; "
                "export it with `clinfer export`."
            )
        try:
            spec = json.loads(raw)
            version_info = spec.get("versions", {}).get(str(version), {})
            return cls(
                name=spec["name"],
                version=str(version),
                sha256=version_info.get("sha256", ""),
                labels=tuple(spec["labels"]),
                positive_label=spec["positive_label"],
                threshold=float(spec["threshold"]),
                input_name=spec["input"]["name"],
                channels=int(spec["input"]["channels"]),
                height=int(spec["input"]["height"]),
                width=int(spec["input"]["width"]),
                output_name=spec["output"]["name"],
                accepts=spec["accepts"],
                training=spec.get("training", {}),
                max_batch_size=int(config.get("max_batch_size", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelSpecError(
                f"model {name!r} has an invalid clinfer spec: {exc}"
            ) from exc


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """Split ``NAME[:VERSION]`` into its parts."""
    name, _, version = ref.partition(":")
    if not name or (version and not version.isdigit()):
        raise ValueError(
            f"invalid model reference {ref!r}; expected NAME or NAME:VERSION"
        )
    return name, version or None


class TritonModelClient:
    """A gRPC client bound to one model on one Triton server."""

    def __init__(self, url: str, model: str, version: str | None = None):
        self.url = url
        self.model = model
        self.version = version
        try:
            self._client = triton_grpc.InferenceServerClient(url)
        except InferenceServerException as exc:
            raise ServerError(
                f"cannot create a gRPC client for Triton at {url}: {exc}"
            ) from exc

    def wait_ready(self, *, timeout_s: float = 60.0) -> None:
        """Wait until the model is ready on the server.

        Raises
        ------
        ServerNotReadyError
            If the model is not ready within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            try:
                if self._client.is_model_ready(self.model, self.version or ""):
                    return
                last_error = "model not ready"
            except InferenceServerException as exc:
                last_error = str(exc)
            time.sleep(0.5)
        raise ServerNotReadyError(
            f"model {self.model!r} is not ready on Triton at {self.url} after "
            f"{timeout_s:.0f} s ({last_error}); check the server log and that the model "
            "repository holds the model."
        )

    def fetch_spec(self) -> ModelSpec:
        """Read the model's clinfer spec and resolve the served version.

        Raises
        ------
        ServerError, ModelSpecError
        """
        try:
            metadata = self._client.get_model_metadata(
                self.model, self.version or "", as_json=True
            )
            config = self._client.get_model_config(
                self.model, self.version or "", as_json=True
            )
        except InferenceServerException as exc:
            raise ServerError(
                f"cannot read model {self.model!r} from Triton at {self.url}: {exc.message()}"
            ) from exc
        version = self.version or max(metadata.get("versions", ["1"]), key=int)
        return ModelSpec.from_config(config["config"], version)

    def infer(
        self, images: np.ndarray, spec: ModelSpec, *, priority: int
    ) -> np.ndarray:
        """Run one batch and return the output array, float32 (N, num_labels).

        Raises
        ------
        InferenceError
            If Triton rejects or fails the request.
        """
        tensor = triton_grpc.InferInput(spec.input_name, list(images.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        output = triton_grpc.InferRequestedOutput(spec.output_name)
        try:
            result = self._client.infer(
                spec.name,
                [tensor],
                model_version=spec.version,
                outputs=[output],
                priority=priority,
            )
        except InferenceServerException as exc:
            raise InferenceError(
                f"Triton at {self.url} failed a batch of {images.shape[0]} for "
                f"{spec.name}:{spec.version}: {exc.message()}"
            ) from exc
        array = result.as_numpy(spec.output_name)
        if array is None or array.shape != (images.shape[0], len(spec.labels)):
            raise InferenceError(
                f"Triton at {self.url} returned output {spec.output_name!r} with shape "
                f"{None if array is None else array.shape}, expected "
                f"{(images.shape[0], len(spec.labels))}; the server's Python environment "
                "may have numpy 2, which Triton 2.51's Python backend does not support."
            )
        return array

    def close(self) -> None:
        self._client.close()
