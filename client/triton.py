"""gRPC access to clinfer models on Triton, with errors translated to clinfer's own."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory
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
# Hosts whose Triton server runs on this machine, so that it can map a POSIX shared
# memory region that the client creates.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class ModelSpec:
    """Inputs, outputs and labels of a served clinfer model, from its Triton config."""

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
    # Models with an EMR input (the multimodal composition) also declare its name
    # and length, and return image-only and EMR-only probabilities and a saliency map.
    emr_input: str | None = None
    emr_size: int = 0
    image_output: str | None = None
    emr_output: str | None = None
    saliency_output: str | None = None

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @property
    def training_note(self) -> str:
        """How the model was trained, in words; for a composition, its parts'."""
        note = self.training.get("note") or self.training.get("status")
        if note:
            return str(note)
        parts = {
            name: str(part.get("note") or part.get("status", ""))
            for name, part in self.training.items()
            if isinstance(part, dict)
        }
        notes = sorted({text for text in parts.values() if text})
        if not notes:
            return ""
        return f"composes {', '.join(parts)}: {'; '.join(notes)}"

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
            common = {
                "name": spec["name"],
                "version": str(version),
                "sha256": version_info.get("sha256", ""),
                "labels": tuple(spec["labels"]),
                "positive_label": spec["positive_label"],
                "threshold": float(spec["threshold"]),
                "training": spec.get("training", {}),
                "max_batch_size": int(config.get("max_batch_size", 0)),
            }
            if "input" in spec:
                return cls(
                    **common,
                    input_name=spec["input"]["name"],
                    channels=int(spec["input"]["channels"]),
                    height=int(spec["input"]["height"]),
                    width=int(spec["input"]["width"]),
                    output_name=spec["output"]["name"],
                    accepts=spec["accepts"],
                )
            return cls(**common, **_multi_input_fields(spec))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelSpecError(
                f"model {name!r} has an invalid clinfer spec: {exc}"
            ) from exc


# Models exported from the synthetic chest-radiograph cohort take CR and DX images.
CHEST_RADIOGRAPH_ACCEPTS = {
    "modalities": ["CR", "DX"],
    "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
    "samples_per_pixel": [1],
}


def _multi_input_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """Read the fields of a spec with ``inputs`` and ``outputs`` lists."""
    inputs = {tensor["name"]: tensor for tensor in spec["inputs"]}
    outputs = [tensor["name"] for tensor in spec["outputs"]]
    image = inputs["image"]
    channels, height, width = (int(d) for d in image["dims"])
    emr = inputs.get("emr")
    primary = next(
        name for name in ("fusion_probabilities", "probabilities") if name in outputs
    )
    return {
        "input_name": "image",
        "channels": channels,
        "height": height,
        "width": width,
        "output_name": primary,
        "accepts": spec.get("accepts", CHEST_RADIOGRAPH_ACCEPTS),
        "emr_input": "emr" if emr else None,
        "emr_size": int(emr["dims"][0]) if emr else 0,
        "image_output": "image_probabilities"
        if "image_probabilities" in outputs
        else None,
        "emr_output": "emr_probabilities" if "emr_probabilities" in outputs else None,
        "saliency_output": "saliency" if "saliency" in outputs else None,
    }


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

    def __init__(
        self,
        url: str,
        model: str,
        version: str | None = None,
        *,
        shared_memory: bool = False,
    ):
        """Connect to ``url`` (HOST:PORT of Triton's gRPC endpoint).

        With ``shared_memory``, :meth:`infer` passes input tensors through a POSIX
        shared memory region that the server maps, instead of in the gRPC message,
        when the server is on a loopback address. Where the region cannot be created
        or registered, the client logs a warning and sends tensors over gRPC.

        Raises
        ------
        ServerError
            If the gRPC client cannot be created.
        """
        self.url = url
        self.model = model
        self.version = version
        host = url.rsplit(":", 1)[0] if ":" in url else url
        self._input_region: SystemSharedMemoryInput | None = None
        self._shared_memory = shared_memory and host in LOOPBACK_HOSTS
        try:
            self._client = triton_grpc.InferenceServerClient(url)
        except InferenceServerException as exc:
            raise ServerError(
                f"cannot create a gRPC client for Triton at {url}: {exc}"
            ) from exc

    @property
    def uses_shared_memory(self) -> bool:
        """Whether the next :meth:`infer` call may pass its input in shared memory."""
        return self._shared_memory

    def wait_ready(self, *, timeout_s: float = 60.0) -> None:
        """Wait until the model is ready on the server.

        Raises
        ------
        ModelSpecError
            If the server is up but does not have the model or the version.
        ServerNotReadyError
            If the server cannot be reached, or the model is not ready, within
            ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        reached = False
        last_error = ""
        label = f"{self.model}:{self.version}" if self.version else self.model
        while time.monotonic() < deadline:
            try:
                index = self._client.get_model_repository_index(as_json=True)
                reached = True
                self._check_in_index(index.get("models", []))
                if self._client.is_model_ready(self.model, self.version or ""):
                    return
                last_error = f"model {label} is loading or failed to load"
            except InferenceServerException as exc:
                last_error = exc.message() or str(exc)
            time.sleep(0.5)
        if not reached:
            raise ServerNotReadyError(
                f"cannot reach Triton at {self.url} within {timeout_s:.0f} s "
                f"({last_error}); start a server with `clinfer serve` or check "
                "--triton-url (HOST:PORT of its gRPC endpoint)."
            )
        raise ServerNotReadyError(
            f"model {label} is not ready on Triton at {self.url} after "
            f"{timeout_s:.0f} s ({last_error}); check the server log."
        )

    def _check_in_index(self, entries: list[dict[str, Any]]) -> None:
        names = sorted({entry["name"] for entry in entries})
        if self.model not in names:
            raise ModelSpecError(
                f"Triton at {self.url} has no model {self.model!r}; it has "
                f"{', '.join(names) or 'no models'}. Pass --model with one of them, "
                "or export the model into the server's repository."
            )
        versions = sorted(
            {str(e.get("version", "")) for e in entries if e["name"] == self.model}
            - {""}
        )
        if self.version and versions and self.version not in versions:
            raise ModelSpecError(
                f"Triton at {self.url} has no version {self.version} of model "
                f"{self.model!r}; it has version(s) {', '.join(versions)}."
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
        self._set_input(tensor, images)
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
            # A restarted server has forgotten the region: register a new one on the
            # next call.
            self._release_region()
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

    def infer_multimodal(
        self,
        images: np.ndarray,
        emr: np.ndarray,
        spec: ModelSpec,
        *,
        priority: int,
        saliency: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run one batch of a model with an EMR input and return its outputs by name.

        The priority is sent as Triton's request priority and as the request
        parameter ``clinfer_priority``. The composition copies that parameter onto
        the requests it sends to its composing models, because Triton 2.51's Python
        backend lets a BLS request set no priority of its own.

        Raises
        ------
        InferenceError
            If Triton rejects or fails the request.
        """
        tensors = []
        for name, array in ((spec.input_name, images), (spec.emr_input, emr)):
            tensor = triton_grpc.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            tensors.append(tensor)
        names = [spec.output_name, spec.image_output, spec.emr_output]
        if saliency:
            names.append(spec.saliency_output)
        names = [name for name in names if name]
        try:
            result = self._client.infer(
                spec.name,
                tensors,
                model_version=spec.version,
                outputs=[triton_grpc.InferRequestedOutput(name) for name in names],
                priority=priority,
                parameters={"clinfer_priority": priority},
            )
        except InferenceServerException as exc:
            raise InferenceError(
                f"Triton at {self.url} failed a batch of {images.shape[0]} for "
                f"{spec.name}:{spec.version}: {exc.message()}"
            ) from exc
        arrays = {name: result.as_numpy(name) for name in names}
        for name, array in arrays.items():
            if array is None or array.shape[0] != images.shape[0]:
                raise InferenceError(
                    f"Triton at {self.url} returned output {name!r} with shape "
                    f"{None if array is None else array.shape} for a batch of "
                    f"{images.shape[0]}."
                )
        return arrays

    def _set_input(self, tensor: triton_grpc.InferInput, images: np.ndarray) -> None:
        """Attach ``images`` to ``tensor``, through shared memory where possible."""
        array = np.ascontiguousarray(images, dtype=np.float32)
        if self._shared_memory:
            try:
                if (
                    self._input_region is None
                    or self._input_region.byte_size < array.nbytes
                ):
                    self._release_region()
                    self._input_region = SystemSharedMemoryInput.register(
                        self._client, array.nbytes
                    )
                self._input_region.write(tensor, array)
                return
            except ServerError as exc:
                logger.warning(
                    "sending tensors to Triton at %s over gRPC instead of shared "
                    "memory: %s",
                    self.url,
                    exc,
                )
                self._release_region()
                self._shared_memory = False
        tensor.set_data_from_numpy(array)

    def _release_region(self) -> None:
        region, self._input_region = self._input_region, None
        if region is not None:
            region.release(self._client)

    def close(self) -> None:
        """Release the shared memory region, if any, and close the gRPC channel."""
        self._release_region()
        self._client.close()


class SystemSharedMemoryInput:
    """A POSIX shared memory region registered with one Triton server for inputs.

    The client writes a batch into the region and sends only its name and size in the
    request, so Triton reads the tensor without a copy through the gRPC message. The
    region lives in ``/dev/shm`` until :meth:`release` unlinks it. Python's resource
    tracker unlinks it if the process exits without that.
    """

    def __init__(self, memory: shared_memory.SharedMemory, name: str):
        self.memory = memory
        self.name = name
        self.byte_size = memory.size

    @classmethod
    def register(
        cls, client: triton_grpc.InferenceServerClient, byte_size: int
    ) -> SystemSharedMemoryInput:
        """Create a region of at least ``byte_size`` bytes and register it.

        Raises
        ------
        ServerError
            If the region cannot be created or the server rejects it (a server on
            another machine or in a container without this ``/dev/shm``).
        """
        name = f"clinfer_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        try:
            memory = shared_memory.SharedMemory(name=name, create=True, size=byte_size)
        except (OSError, ValueError) as exc:
            raise ServerError(
                f"cannot create a shared memory region of {byte_size} bytes in "
                f"/dev/shm: {exc}"
            ) from exc
        try:
            client.register_system_shared_memory(name, f"/{name}", memory.size)
        except InferenceServerException as exc:
            memory.close()
            memory.unlink()
            raise ServerError(
                f"Triton rejected the shared memory region /{name}: {exc.message()}"
            ) from exc
        return cls(memory, name)

    def write(self, tensor: triton_grpc.InferInput, array: np.ndarray) -> None:
        """Copy ``array`` (C-contiguous float32) into the region and point ``tensor`` at it."""
        view = np.ndarray(array.shape, dtype=np.float32, buffer=self.memory.buf)
        view[...] = array
        del view
        tensor.set_shared_memory(self.name, array.nbytes)

    def release(self, client: triton_grpc.InferenceServerClient) -> None:
        """Unregister the region from the server and remove it from ``/dev/shm``."""
        try:
            client.unregister_system_shared_memory(self.name)
        except InferenceServerException as exc:
            logger.warning(
                "unregistering shared memory region %s failed: %s",
                self.name,
                exc.message(),
            )
        self.memory.close()
        try:
            self.memory.unlink()
        except FileNotFoundError:
            pass
