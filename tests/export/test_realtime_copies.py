"""Real-time copies of the composition: configs, re-publishing and the option."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from clinfer.client import Client
from clinfer.export.composition import (
    COMPOSING_MODELS,
    COMPOSITION_NAME,
    STEP_SUFFIX_PARAMETER,
    publish_composing_model,
    publish_composition,
)
from clinfer.export.multimodal import ExportReport
from clinfer.export.repository import REALTIME_MODEL_PARAMETER, existing_versions
from clinfer.export.served_repository import (
    SPEC_FILE,
    ServingOptions,
    publish_realtime_copy,
)
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from clinfer.errors import ExportError
from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv

NAMES = (*COMPOSING_MODELS, COMPOSITION_NAME)
NATIVE_CONFIGS = ("configs/onnxruntime.pbtxt", "configs/tensorrt.pbtxt")


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _config_files(model_dir: Path) -> list[Path]:
    return [model_dir / "config.pbtxt", *sorted(model_dir.glob("configs/*.pbtxt"))]


def _spec(repository: Path, name: str) -> dict:
    return json.loads((repository / name / SPEC_FILE).read_text())


def _version_files(repository: Path, name: str, version: int) -> dict[str, bytes]:
    folder = repository / name / str(version)
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


@pytest.mark.parametrize("name", NAMES)
def test_copy_configs_priority_one(mm_export: ExportReport, name: str) -> None:
    files = _config_files(mm_export.repository / f"{name}_realtime")
    assert files
    for path in files:
        config = _parse(path)
        assert config.name == f"{name}_realtime", path
        assert config.dynamic_batching.default_priority_level == 1, path
        assert config.dynamic_batching.max_queue_delay_microseconds == 0, path
        assert config.instance_group[0].count == 1, path
        assert REALTIME_MODEL_PARAMETER not in config.parameters, path


@pytest.mark.parametrize("name", NAMES)
def test_batch_configs_name_copy(mm_export: ExportReport, name: str) -> None:
    for path in _config_files(mm_export.repository / name):
        config = _parse(path)
        value = config.parameters[REALTIME_MODEL_PARAMETER].string_value
        assert value == f"{name}_realtime", path
        assert config.dynamic_batching.default_priority_level == 2, path


@pytest.mark.parametrize("name", COMPOSING_MODELS)
def test_copy_has_native_configs(mm_export: ExportReport, name: str) -> None:
    for relative in NATIVE_CONFIGS:
        batch = _parse(mm_export.repository / name / relative)
        copy = _parse(mm_export.repository / f"{name}_realtime" / relative)
        assert copy.backend == batch.backend, relative
        assert copy.default_model_filename == batch.default_model_filename, relative


def test_composition_copy_has_suffix(mm_export: ExportReport) -> None:
    config = _parse(mm_export.repository / "multimodal_realtime" / "config.pbtxt")
    batch = _parse(mm_export.repository / COMPOSITION_NAME / "config.pbtxt")
    assert config.parameters[STEP_SUFFIX_PARAMETER].string_value == "_realtime"
    assert STEP_SUFFIX_PARAMETER not in batch.parameters
    assert config.backend == "python"


def test_composition_copy_same_files(mm_export: ExportReport) -> None:
    version = mm_export.composition_version
    repository = mm_export.repository
    batch = _version_files(repository, COMPOSITION_NAME, version)
    copy = _version_files(repository, "multimodal_realtime", version)
    assert copy == batch


def test_copy_of_unpublished_model_raises(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="publish cxr_cnn before"):
        publish_realtime_copy(tmp_path, "cxr_cnn")


@pytest.fixture
def republished(mm_export: ExportReport, tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """Copy the exported repository and re-publish cxr_cnn with changed files."""
    repository = tmp_path / "repository"
    shutil.copytree(mm_export.repository, repository, symlinks=True)
    shutil.rmtree(repository / "breast_cancer_logistic")
    versions = {name: mm_export.models[name].version for name in COMPOSING_MODELS}
    spec = _spec(repository, "cxr_cnn")
    files = _version_files(repository, "cxr_cnn", versions["cxr_cnn"])
    files["onnx_host.py"] += b"\n# republished\n"
    spec.pop("versions")
    versions["cxr_cnn"], created = publish_composing_model(
        repository, spec, files, version_info={"note": "republished"}
    )
    assert created
    specs = {name: _spec(repository, name) for name in COMPOSING_MODELS}
    publish_composition(repository, specs, versions)
    return repository, versions


def test_republish_bumps_copy(republished: tuple[Path, dict[str, int]]) -> None:
    repository, versions = republished
    batch = _spec(repository, "cxr_cnn")
    copy = _spec(repository, "cxr_cnn_realtime")
    assert existing_versions(repository / "cxr_cnn_realtime")[-1] == versions["cxr_cnn"]
    assert copy["versions"] == batch["versions"]


def test_republish_bumps_composition_copy(
    republished: tuple[Path, dict[str, int]], mm_export: ExportReport
) -> None:
    repository, versions = republished
    latest = existing_versions(repository / "multimodal_realtime")[-1]
    steps = _spec(repository, "multimodal_realtime")["versions"][str(latest)]["steps"]
    pinned = {step["model"]: step["version"] for step in steps}
    assert latest == mm_export.composition_version + 1
    assert latest == existing_versions(repository / COMPOSITION_NAME)[-1]
    assert pinned == versions


def test_republish_replaces_changed_version(
    republished: tuple[Path, dict[str, int]],
) -> None:
    repository, versions = republished
    version = versions["emr_mlp"]
    target = repository / "emr_mlp_realtime" / str(version) / "model.onnx"
    target.unlink()
    target.write_bytes(b"stale")
    spec = _spec(repository, "emr_mlp_realtime")
    spec["versions"][str(version)]["sha256"] = "0" * 64
    (repository / "emr_mlp_realtime" / SPEC_FILE).write_text(json.dumps(spec))
    publish_realtime_copy(repository, "emr_mlp")
    source = repository / "emr_mlp" / str(version) / "model.onnx"
    assert target.read_bytes() == source.read_bytes()


def test_option_off_removes_copies(republished: tuple[Path, dict[str, int]]) -> None:
    repository, versions = republished
    options = ServingOptions(realtime_models=False)
    for name in COMPOSING_MODELS:
        files = _version_files(repository, name, versions[name])
        spec = _spec(repository, name)
        spec.pop("versions")
        publish_composing_model(
            repository, spec, files, version_info={}, options=options
        )
    specs = {name: _spec(repository, name) for name in COMPOSING_MODELS}
    publish_composition(repository, specs, versions, options)
    config = _parse(repository / COMPOSITION_NAME / "config.pbtxt")
    for name in NAMES:
        assert not (repository / f"{name}_realtime").exists(), name
    assert REALTIME_MODEL_PARAMETER not in config.parameters


@pytest.fixture
def republished_server(
    republished: tuple[Path, dict[str, int]], tmp_path: Path
) -> Iterator[EmbeddedTritonServer]:
    repository, _ = republished
    with EmbeddedTritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=tmp_path / "tritonserver.log",
    ) as server:
        yield server


def test_query_names_republished_version(
    republished_server: EmbeddedTritonServer,
    mm_export: ExportReport,
    mm_cohort: CohortManifest,
) -> None:
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    patient = mm_cohort.split("test")[0]
    emr = dict(
        zip(
            EMR_FEATURES,
            emr_features(records[(patient.patient_id, patient.accession_number)]),
        )
    )
    with Client([republished_server.grpc_url], model="multimodal") as client:
        result = client.query(mm_cohort.path_of(patient.dicom_path), emr=emr)
    assert result.triton_model == "multimodal_realtime"
    assert result.model_version == str(mm_export.composition_version + 1)
