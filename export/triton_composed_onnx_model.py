"""Triton Python-backend ONNX host that counts requests by the priority they carry.

Copied into ``<name>/<version>/model.py`` of models that a composition calls, next to
``onnx_host.py`` (a copy of ``triton_onnx_model.py``, which runs ONNX Runtime) and
``model.onnx``. Triton 2.51's Python backend exposes no request priority to Python,
so the priority is read from the request parameter ``clinfer_priority``, which the
composition and ``clinfer.export.composition.infer_multimodal`` set. Each request
increments the Prometheus counter ``clinfer_requests_by_priority_total{model,
priority}`` on Triton's metrics endpoint; requests without the parameter count under
the model's ``default_priority_level``.
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils

# The stub loads this file by path, and onnx_host.py is in the same folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onnx_host import TritonPythonModel as OnnxHost  # noqa: E402

PRIORITY_PARAMETER = "clinfer_priority"
PRIORITY_METRIC = "clinfer_requests_by_priority_total"


def request_priority(request, default):
    """Return the ``clinfer_priority`` parameter of a request, else ``default``."""
    try:
        value = json.loads(request.parameters() or "{}").get(PRIORITY_PARAMETER)
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


class TritonPythonModel(OnnxHost):
    """ONNX Runtime host that also records the priority of every request."""

    def initialize(self, args):
        super().initialize(args)
        self.model_name = args["model_name"]
        batching = self.model_config.get("dynamic_batching", {})
        self.default_priority = int(batching.get("default_priority_level", 0))
        self.family = pb_utils.MetricFamily(
            name=PRIORITY_METRIC,
            description="Requests received, by model and request priority level",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.counters = {}

    def execute(self, requests):
        for request in requests:
            priority = request_priority(request, self.default_priority)
            counter = self.counters.get(priority)
            if counter is None:
                counter = self.family.Metric(
                    labels={"model": self.model_name, "priority": str(priority)}
                )
                self.counters[priority] = counter
            counter.increment(1)
        return super().execute(requests)
