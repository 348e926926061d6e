"""Triton Python-backend (BLS) model composing the image, EMR and fusion models.

Copied into ``multimodal/<version>/model.py`` next to ``composition.json``, which
names the composing models and the versions they were published with. Each batch of
requests is grouped by priority, and every group makes one BLS call to each composing
model. The inputs ``image`` (1, 224, 224) and ``emr`` (raw feature values) go to the
image model (probabilities and saliency), the EMR model and the fusion model.

Priority: Triton drops request priority inside ensembles, and Triton 2.51's Python
backend neither shows a request's priority to Python nor accepts one for a BLS
request. The caller therefore sends its priority twice: as the request priority,
which orders this model's own dynamic-batching queue, and as the request parameter
``clinfer_priority``, which this model reads and sets on every composing request.
Where the stub's ``InferenceRequest`` accepts ``priority`` (a later Python backend),
it is passed as well, so composing queues order by it.

Real-time copy: ``multimodal_realtime`` serves the same ``model.py`` and
``composition.json`` bytes, and its config parameter ``clinfer_step_suffix``
("_realtime") is appended to every composing model's name. Its calls therefore go to
``cxr_cnn_realtime``, ``emr_mlp_realtime`` and ``fusion_realtime`` at the pinned
versions, whose instances batch jobs do not call.
"""

import json
import logging
import os

import numpy as np
import triton_python_backend_utils as pb_utils

logger = logging.getLogger(__name__)

PRIORITY_PARAMETER = "clinfer_priority"
PRIORITY_METRIC = "clinfer_requests_by_priority_total"
STEP_SUFFIX_PARAMETER = "clinfer_step_suffix"


class CompositionError(Exception):
    """A composing model returned an error."""


def _bls_accepts_priority():
    """Return whether this stub's InferenceRequest takes a ``priority`` argument."""
    try:
        pb_utils.InferenceRequest(
            model_name="probe", requested_output_names=[], inputs=[], priority=1
        )
    except TypeError:
        return False
    return True


class TritonPythonModel:
    """BLS composition of the image, EMR and fusion models."""

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "composition.json")) as handle:
            self.composition = json.load(handle)
        parameters = self.model_config.get("parameters", {})
        suffix = parameters.get(STEP_SUFFIX_PARAMETER, {}).get("string_value", "")
        self.steps = [
            {**step, "model": step["model"] + suffix}
            for step in self.composition["steps"]
        ]
        batching = self.model_config.get("dynamic_batching", {})
        self.default_priority = int(batching.get("default_priority_level", 0))
        self.forward_priority = _bls_accepts_priority()
        self.family = pb_utils.MetricFamily(
            name=PRIORITY_METRIC,
            description="Requests received, by model and request priority level",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.counters = {}
        logger.info(
            "%s composes %s; BLS request priority supported: %s",
            self.model_name,
            ", ".join(f"{step['model']}:{step['version']}" for step in self.steps),
            self.forward_priority,
        )

    def _priority(self, request):
        try:
            parameters = json.loads(request.parameters() or "{}")
            value = parameters.get(PRIORITY_PARAMETER)
            return int(value) if value is not None else self.default_priority
        except (TypeError, ValueError):
            return self.default_priority

    def _count(self, priority):
        counter = self.counters.get(priority)
        if counter is None:
            counter = self.family.Metric(
                labels={"model": self.model_name, "priority": str(priority)}
            )
            self.counters[priority] = counter
        counter.increment(1)

    def _call(self, step, arrays, priority):
        inputs = [pb_utils.Tensor(name, arrays[name]) for name in step["inputs"]]
        kwargs = {
            "model_name": step["model"],
            "model_version": int(step["version"]),
            "requested_output_names": list(step["outputs"]),
            "inputs": inputs,
            "parameters": {PRIORITY_PARAMETER: int(priority)},
        }
        # NOTE: on Triton 2.51 only the parameter arrives; the composing models'
        # queues order these requests at their default priority level.
        if self.forward_priority:
            kwargs["priority"] = int(priority)
        response = pb_utils.InferenceRequest(**kwargs).exec()
        if response.has_error():
            raise CompositionError(
                f"{step['model']} version {step['version']} failed: "
                f"{response.error().message()}"
            )
        return {
            served: pb_utils.get_output_tensor_by_name(response, name).as_numpy()
            for name, served in step["outputs"].items()
        }

    def execute(self, requests):
        groups = {}
        for index, request in enumerate(requests):
            priority = self._priority(request)
            self._count(priority)
            groups.setdefault(priority, []).append(index)

        responses = [None] * len(requests)
        for priority, indices in groups.items():
            arrays = {}
            sizes = []
            for name in ("image", "emr"):
                parts = [
                    pb_utils.get_input_tensor_by_name(requests[i], name).as_numpy()
                    for i in indices
                ]
                arrays[name] = np.ascontiguousarray(np.concatenate(parts, axis=0))
                sizes = [len(part) for part in parts]
            try:
                outputs = {}
                for step in self.steps:
                    outputs.update(self._call(step, arrays, priority))
            except CompositionError as exc:
                error = pb_utils.TritonError(str(exc))
                for i in indices:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            start = 0
            for i, size in zip(indices, sizes):
                tensors = [
                    pb_utils.Tensor(
                        name,
                        np.ascontiguousarray(value[start : start + size], np.float32),
                    )
                    for name, value in outputs.items()
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += size
        return responses

    def finalize(self):
        self.counters = {}
