"""Export of the trained models: parity gates, repository configs, serving, priority."""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton_grpc
from clinfer.export import gpu_checks
from clinfer.export.composition import (
    COMPOSITION_NAME,
    OUTPUT_NAMES,
    infer_multimodal,
    priority_counts,
)
from clinfer.export.multimodal import (
    ExportReport,
    ModelPlan,
    RealInputs,
    export_and_gate,
    export_trained_models,
)
from clinfer.export.parity import REAL_GATE, check_gate, export_multi_onnx
from clinfer.export.served_repository import publish_model
from clinfer.export.tensorrt_engine import tensorrt_unavailable_reason
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from clinfer.cli import app
from clinfer.errors import ParityError
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import CohortManifest

SERVED = ("cxr_cnn", "emr_mlp", "fusion", "breast_cancer_logistic")
COMPOSING = ("cxr_cnn", "emr_mlp", "fusion")
PERTURBED = ("cxr_cnn", "emr_mlp", "fusion")
TOLERANCE = 1e-4
NO_TENSORRT = tensorrt_unavailable_reason() is not None


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _rows(report: ExportReport) -> dict[str, dict]:
    return {row["model"]: row for row in report.rows()}


def _perturbed(plan: ModelPlan) -> torch.nn.Module:
    """Return a copy of the plan's module with the final layer's bias shifted."""
    module = copy.deepcopy(plan.module)
    if plan.name == "cxr_cnn":
        layer = module.model.classifier
    elif plan.name == "fusion":
        layer = module.head.net[-1]
    else:
        layer = module.net[-1]
    with torch.no_grad():
        layer.bias += torch.tensor([0.0, 0.02])
    return module


@pytest.mark.parametrize("name", SERVED)
def test_random_gate_within_tolerance(mm_export: ExportReport, name: str) -> None:
    diffs = _rows(mm_export)[name]["random_max_abs_diff"]
    assert diffs["probabilities"] <= TOLERANCE


@pytest.mark.parametrize("name", SERVED)
def test_real_gate_within_tolerance(mm_export: ExportReport, name: str) -> None:
    diffs = _rows(mm_export)[name]["real_max_abs_diff"]
    assert diffs["probabilities"] <= TOLERANCE


@pytest.mark.parametrize("name", ("cxr_cnn", "emr_mlp", "fusion"))
def test_real_gate_covers_test_split(
    mm_export: ExportReport, mm_cohort: CohortManifest, name: str
) -> None:
    assert _rows(mm_export)[name]["real_samples"] == len(mm_cohort.split("test"))


def test_real_gate_checks_saliency(mm_export: ExportReport) -> None:
    assert "saliency" in _rows(mm_export)["cxr_cnn"]["real_max_abs_diff"]


@pytest.mark.parametrize("name", PERTURBED)
def test_gates_reject_perturbed_export(
    mm_plans: dict[str, ModelPlan],
    mm_real: dict[str, RealInputs],
    tmp_path: Path,
    name: str,
) -> None:
    plan = mm_plans[name]
    with pytest.raises(ParityError, match="parity gate failed") as info:
        export_and_gate(
            plan,
            tmp_path / "model.onnx",
            mm_real[name],
            seed=0,
            exported_module=_perturbed(plan),
        )
    assert info.value.max_abs_diff > TOLERANCE


# Uniform random images saturate the softmax of the image and fusion models, so
# only the real-input gate detects their perturbation.
@pytest.mark.parametrize("name", ("emr_mlp", "breast_cancer_logistic"))
def test_random_gate_rejects_perturbed_export(
    mm_plans: dict[str, ModelPlan],
    mm_real: dict[str, RealInputs],
    tmp_path: Path,
    name: str,
) -> None:
    plan = mm_plans[name]
    with pytest.raises(ParityError, match="random-input parity gate failed"):
        export_and_gate(
            plan,
            tmp_path / "model.onnx",
            mm_real[name],
            seed=0,
            exported_module=_perturbed(plan),
        )


@pytest.mark.parametrize("name", PERTURBED)
def test_real_gate_rejects_perturbed_export(
    mm_plans: dict[str, ModelPlan],
    mm_real: dict[str, RealInputs],
    tmp_path: Path,
    name: str,
) -> None:
    plan = mm_plans[name]
    path = tmp_path / "model.onnx"
    export_multi_onnx(
        _perturbed(plan),
        path,
        examples=mm_real[name].batches[0],
        output_names=plan.output_names,
    )
    with pytest.raises(ParityError, match="real-input parity gate failed"):
        check_gate(
            name,
            plan.module,
            path,
            mm_real[name].batches,
            gate=REAL_GATE,
            output_tolerances=plan.output_tolerances,
        )


def test_parity_error_names_output_and_diff(
    mm_plans: dict[str, ModelPlan], mm_real: dict[str, RealInputs], tmp_path: Path
) -> None:
    plan = mm_plans["emr_mlp"]
    with pytest.raises(ParityError, match=r"output 'probabilities' differs .* by \d"):
        export_and_gate(
            plan,
            tmp_path / "model.onnx",
            mm_real["emr_mlp"],
            seed=0,
            exported_module=_perturbed(plan),
        )


def test_failed_gate_publishes_nothing(
    mm_models: Path, mm_cohort: CohortManifest, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    with pytest.raises(ParityError):
        export_trained_models(
            mm_models, mm_cohort.root, repository, tolerance=1e-12, tensorrt=False
        )
    assert not repository.exists() or not any(repository.iterdir())


@pytest.mark.parametrize(
    ("name", "config", "backend"),
    [
        *[(name, "config.pbtxt", "python") for name in SERVED],
        *[(name, "configs/onnxruntime.pbtxt", "onnxruntime") for name in SERVED],
        *[(name, "configs/tensorrt.pbtxt", "tensorrt") for name in SERVED],
        (COMPOSITION_NAME, "config.pbtxt", "python"),
    ],
)
def test_config_parses(
    mm_export: ExportReport, name: str, config: str, backend: str
) -> None:
    parsed = _parse(mm_export.repository / name / config)
    assert parsed.backend == backend


@pytest.mark.parametrize("name", SERVED)
def test_config_has_warmup(mm_export: ExportReport, name: str) -> None:
    parsed = _parse(mm_export.repository / name / "config.pbtxt")
    assert len(parsed.model_warmup) == 1


@pytest.mark.parametrize("name", [*SERVED, COMPOSITION_NAME])
def test_config_priority_levels(mm_export: ExportReport, name: str) -> None:
    parsed = _parse(mm_export.repository / name / "config.pbtxt")
    assert parsed.dynamic_batching.priority_levels == 2


@pytest.mark.parametrize("name", [*SERVED, COMPOSITION_NAME])
def test_config_version_policy_latest(mm_export: ExportReport, name: str) -> None:
    parsed = _parse(mm_export.repository / name / "config.pbtxt")
    assert parsed.version_policy.latest.num_versions == 1


@pytest.mark.parametrize("name", [*SERVED, COMPOSITION_NAME])
def test_spec_documents_outputs(mm_export: ExportReport, name: str) -> None:
    model_dir = mm_export.repository / name
    spec = json.loads((model_dir / "clinfer.json").read_text())
    parsed = _parse(model_dir / "config.pbtxt")
    assert [o["name"] for o in spec["outputs"]] == [o.name for o in parsed.output]


def test_probability_outputs_have_labels(mm_export: ExportReport) -> None:
    model_dir = mm_export.repository / "fusion"
    parsed = _parse(model_dir / "config.pbtxt")
    assert parsed.output[0].label_filename == "labels.txt"


def test_labels_file_lists_classes(mm_export: ExportReport) -> None:
    labels = (mm_export.repository / "fusion" / "labels.txt").read_text().split()
    assert labels == ["negative", "positive"]


def test_composition_pins_published_versions(mm_export: ExportReport) -> None:
    version_dir = mm_export.repository / COMPOSITION_NAME / "1"
    steps = json.loads((version_dir / "composition.json").read_text())["steps"]
    pinned = {step["model"]: step["version"] for step in steps}
    assert pinned == {name: mm_export.models[name].version for name in COMPOSING}


def test_republish_same_files_keeps_version(
    mm_plans: dict[str, ModelPlan], tmp_path: Path
) -> None:
    spec = mm_plans["emr_mlp"].spec
    files = {"model.onnx": b"weights"}
    publish_model(tmp_path, spec, files, version_info={})
    assert publish_model(tmp_path, spec, files, version_info={}) == (1, False)


def test_republish_changed_files_adds_version(
    mm_plans: dict[str, ModelPlan], tmp_path: Path
) -> None:
    spec = mm_plans["emr_mlp"].spec
    publish_model(tmp_path, spec, {"model.onnx": b"weights"}, version_info={})
    changed = {"model.onnx": b"other weights"}
    assert publish_model(tmp_path, spec, changed, version_info={}) == (2, True)


@pytest.fixture(scope="module")
def served(
    mm_server: EmbeddedTritonServer, mm_test_inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    client = triton_grpc.InferenceServerClient(mm_server.grpc_url)
    image, emr = mm_test_inputs["image"][:5], mm_test_inputs["emr"][:5]
    result = infer_multimodal(client, image, emr, priority=1)
    return {name: getattr(result, name) for name in OUTPUT_NAMES}


def _onnx_reference(
    repository: Path, inputs: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    image, emr = inputs["image"][:5], inputs["emr"][:5]

    def run(name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        path = repository / name / "1" / "model.onnx"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    probabilities, saliency = run("cxr_cnn", {"image": image})
    return {
        "fusion_probabilities": run("fusion", {"image": image, "emr": emr})[0],
        "image_probabilities": probabilities,
        "emr_probabilities": run("emr_mlp", {"emr": emr})[0],
        "saliency": saliency,
    }


@pytest.mark.parametrize("output", OUTPUT_NAMES)
def test_served_matches_onnx_runtime(
    served: dict[str, np.ndarray],
    mm_export: ExportReport,
    mm_test_inputs: dict[str, np.ndarray],
    output: str,
) -> None:
    expected = _onnx_reference(mm_export.repository, mm_test_inputs)[output]
    assert np.max(np.abs(served[output] - expected)) <= 1e-6


def test_served_saliency_shape(served: dict[str, np.ndarray]) -> None:
    assert served["saliency"].shape == (5, 224, 224)


def test_served_saliency_min(served: dict[str, np.ndarray]) -> None:
    assert served["saliency"].min() >= 0.0


def test_served_saliency_max(served: dict[str, np.ndarray]) -> None:
    assert served["saliency"].max() == pytest.approx(1.0)


def _counts(server: EmbeddedTritonServer) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        return priority_counts(response.read().decode())


@pytest.mark.parametrize("priority", (1, 2))
@pytest.mark.parametrize("model", [*COMPOSING, COMPOSITION_NAME])
def test_priority_reaches_model(
    mm_server: EmbeddedTritonServer,
    mm_test_inputs: dict[str, np.ndarray],
    model: str,
    priority: int,
) -> None:
    client = triton_grpc.InferenceServerClient(mm_server.grpc_url)
    key = (model, str(priority))
    before = _counts(mm_server).get(key, 0.0)
    image, emr = mm_test_inputs["image"][:1], mm_test_inputs["emr"][:1]
    infer_multimodal(client, image, emr, priority=priority)
    assert _counts(mm_server).get(key, 0.0) - before == 1.0


def test_realtime_request_not_counted_as_batch(
    mm_server: EmbeddedTritonServer, mm_test_inputs: dict[str, np.ndarray]
) -> None:
    client = triton_grpc.InferenceServerClient(mm_server.grpc_url)
    before = _counts(mm_server)
    image, emr = mm_test_inputs["image"][:1], mm_test_inputs["emr"][:1]
    infer_multimodal(client, image, emr, priority=1)
    after = _counts(mm_server)
    assert after.get(("fusion", "2"), 0.0) == before.get(("fusion", "2"), 0.0)


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT and a GPU are present")
@pytest.mark.parametrize("name", SERVED)
def test_tensorrt_reported_skipped(mm_export: ExportReport, name: str) -> None:
    assert _rows(mm_export)[name]["tensorrt"] == "skipped"


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT and a GPU are present")
def test_tensorrt_skip_recorded_in_spec(mm_export: ExportReport) -> None:
    spec = json.loads((mm_export.repository / "fusion" / "clinfer.json").read_text())
    assert spec["versions"]["1"]["tensorrt"]["status"] == "skipped"


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT and a GPU are present")
def test_tensorrt_skip_has_reason(mm_export: ExportReport) -> None:
    assert "tensorrt" in _rows(mm_export)["fusion"]["tensorrt_reason"].lower()


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT and a GPU are present")
def test_gpu_checks_exit_without_tensorrt(
    mm_models: Path, mm_cohort: CohortManifest, capsys: pytest.CaptureFixture[str]
) -> None:
    status = gpu_checks.main(
        ["--models", str(mm_models), "--cohort", str(mm_cohort.root)]
    )
    assert status == gpu_checks.EXIT_UNAVAILABLE
    assert "GPU checks not run" in capsys.readouterr().err


def test_cli_export_trained(
    mm_models: Path, mm_cohort: CohortManifest, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    result = CliRunner().invoke(
        app,
        [
            "export-trained",
            "--models",
            str(mm_models),
            "--cohort",
            str(mm_cohort.root),
            "--repository",
            str(repository),
            "--report",
            str(tmp_path / "report.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (repository / COMPOSITION_NAME / "1" / "model.py").is_file()
