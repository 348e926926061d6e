"""Triton Python-backend model that runs an ONNX file with ONNX Runtime on the CPU.

This file is copied into ``model_repository/<name>/<version>/model.py`` next to
``model.onnx``. It runs inside Triton's Python backend stub, so it imports only numpy,
onnxruntime and ``triton_python_backend_utils`` (never clinfer). Requests that the
dynamic batcher groups together are concatenated and run as one ONNX Runtime call.

Config parameters read here: ``intra_op_threads`` is the ONNX Runtime thread count
(0 for its default). ``allow_spinning`` "0" stops idle ONNX Runtime threads from
busy-waiting for work, which otherwise takes CPU from other instances.
``process_nice`` is added to this stub process's nice value, so a batch model's
instances can yield the CPU to a real-time model's. A config output named
``compute_ms`` that the ONNX file lacks is filled with the wall time, in milliseconds,
of the ``session.run`` call that computed each row, so clients can split a round trip
into server compute and everything else.
"""

import json
import logging
import os
import time

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

logger = logging.getLogger(__name__)

COMPUTE_OUTPUT = "compute_ms"


class TritonPythonModel:
    """Triton Python model hosting one ONNX Runtime session."""

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        parameters = self.model_config.get("parameters", {})
        threads = int(parameters.get("intra_op_threads", {}).get("string_value", "0"))
        nice = int(parameters.get("process_nice", {}).get("string_value", "0"))
        if nice > 0:
            os.nice(nice)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        spinning = parameters.get("allow_spinning", {}).get("string_value", "1")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(
            os.path.join(version_dir, "model.onnx"),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self.input_names = [i["name"] for i in self.model_config["input"]]
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        self.output_names = [
            o["name"] for o in self.model_config["output"] if o["name"] in onnx_outputs
        ]
        self.compute_output = (
            any(o["name"] == COMPUTE_OUTPUT for o in self.model_config["output"])
            and COMPUTE_OUTPUT not in onnx_outputs
        )
        self.output_dtypes = {
            o["name"]: pb_utils.triton_string_to_numpy(o["data_type"])
            for o in self.model_config["output"]
        }

    def execute(self, requests):
        arrays = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            first = None
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                arrays[name].append(tensor)
                first = tensor if first is None else first
            sizes.append(first.shape[0])

        feeds = {name: np.concatenate(parts, axis=0) for name, parts in arrays.items()}
        try:
            started = time.perf_counter()
            results = self.session.run(self.output_names, feeds)
            compute_ms = (time.perf_counter() - started) * 1000.0
        except Exception as exc:  # ONNX Runtime raises its own exception types
            error = pb_utils.TritonError(f"ONNX Runtime failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]

        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(
                    name,
                    np.ascontiguousarray(
                        result[start : start + size], dtype=self.output_dtypes[name]
                    ),
                )
                for name, result in zip(self.output_names, results)
            ]
            if self.compute_output:
                timing = np.full((size, 1), compute_ms, dtype=np.float32)
                tensors.append(pb_utils.Tensor(COMPUTE_OUTPUT, timing))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None
