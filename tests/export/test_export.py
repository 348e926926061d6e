"""Export to ONNX, parity gate and model repository layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from clinfer.export.cxr import INPUT_SIZE, ExportResult, export_cxr_model
from clinfer.export.models import build_untrained_cxr_model
from clinfer.export.onnx_export import check_parity, export_onnx
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2

from clinfer.errors import ParityError


def _parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_parity_within_tolerance(exported_model: ExportResult) -> None:
    assert exported_model.parity.max_abs_diff <= 1e-4


def test_parity_gate_rejects_perturbed_onnx(tmp_path: Path) -> None:
    model = build_untrained_cxr_model(0)
    shape = (1, INPUT_SIZE, INPUT_SIZE)
    path = tmp_path / "model.onnx"
    export_onnx(model, path, input_shape=shape)

    proto = onnx.load(str(path))
    weights = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    array = numpy_helper.to_array(weights).copy()
    array += 0.05
    weights.CopyFrom(numpy_helper.from_array(array, weights.name))
    onnx.save(proto, str(path))

    with pytest.raises(ParityError, match="above the tolerance") as info:
        check_parity(model, path, input_shape=shape)
    assert info.value.max_abs_diff > 1e-4


def test_python_backend_config(model_repository: Path) -> None:
    config = _parse_config(model_repository / "cxr_resnet" / "config.pbtxt")
    assert config.backend == "python"
    assert config.max_batch_size == 32
    assert list(config.input[0].dims) == [1, INPUT_SIZE, INPUT_SIZE]
    assert config.dynamic_batching.priority_levels == 2
    assert config.dynamic_batching.default_priority_level == 2


def test_onnxruntime_backend_config(model_repository: Path) -> None:
    config = _parse_config(
        model_repository / "cxr_resnet" / "configs" / "onnxruntime.pbtxt"
    )
    assert config.backend == "onnxruntime"
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.dynamic_batching.max_queue_delay_microseconds > 0


def test_config_says_untrained(model_repository: Path) -> None:
    config = _parse_config(model_repository / "cxr_resnet" / "config.pbtxt")
    spec = json.loads(config.parameters["clinfer_spec"].string_value)
    assert spec["training"]["status"] == "untrained"
    assert "UNTRAINED" in spec["training"]["note"]


def test_version_folder_contents(model_repository: Path) -> None:
    version_dir = model_repository / "cxr_resnet" / "1"
    assert (version_dir / "model.onnx").is_file()
    assert (version_dir / "model.py").is_file()


def test_onnx_has_dynamic_batch(model_repository: Path) -> None:
    proto = onnx.load(str(model_repository / "cxr_resnet" / "1" / "model.onnx"))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"


def test_reexport_is_idempotent(tmp_path: Path) -> None:
    first = export_cxr_model(tmp_path)
    second = export_cxr_model(tmp_path)
    assert first.created
    assert not second.created
    assert second.version == first.version


def test_changed_weights_publish_new_version(tmp_path: Path) -> None:
    export_cxr_model(tmp_path, seed=0)
    changed = export_cxr_model(tmp_path, seed=1)
    spec = json.loads((tmp_path / "cxr_resnet" / "clinfer.json").read_text())
    assert changed.version == 2
    assert set(spec["versions"]) == {"1", "2"}
    assert spec["versions"]["1"]["sha256"] != spec["versions"]["2"]["sha256"]
