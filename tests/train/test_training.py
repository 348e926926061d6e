"""Tests of model training: held-out quality, metadata, reloading and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

from clinfer import __version__
from clinfer.errors import ConfigurationError
from clinfer.train.artifacts import METADATA_NAME, load_trained_model
from clinfer.train.cohort import CohortManifest, generate_cohort
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv
from clinfer.train.training import (
    BREAST_CANCER_MODEL,
    EMR_MODEL,
    FUSION_MODEL,
    IMAGE_MODEL,
    TrainingReport,
    binary_metrics,
    deterministic_torch,
    train_all,
)

from .conftest import COHORT_SEED, COHORT_SIZE, TINY_CONFIG, TRAIN_SEED

MODEL_NAMES = (BREAST_CANCER_MODEL, IMAGE_MODEL, EMR_MODEL, FUSION_MODEL)


def _test_auroc(report: TrainingReport, name: str) -> float:
    return report.models[name].test_metrics["auroc"]


# Held-out quality


def test_breast_cancer_accuracy(trained: TrainingReport) -> None:
    assert trained.models[BREAST_CANCER_MODEL].test_metrics["accuracy"] >= 0.95


def test_fusion_auroc(trained: TrainingReport) -> None:
    assert _test_auroc(trained, FUSION_MODEL) >= 0.95


def test_fusion_beats_image(trained: TrainingReport) -> None:
    assert _test_auroc(trained, FUSION_MODEL) > _test_auroc(trained, IMAGE_MODEL)


def test_fusion_beats_emr(trained: TrainingReport) -> None:
    assert _test_auroc(trained, FUSION_MODEL) > _test_auroc(trained, EMR_MODEL)


def test_image_model_detects_findings(trained: TrainingReport) -> None:
    assert trained.models[IMAGE_MODEL].test_metrics["finding_auroc"] >= 0.95


def test_fusion_metrics_on_test_split(
    trained: TrainingReport, cohort: CohortManifest
) -> None:
    assert trained.models[FUSION_MODEL].test_metrics["n"] == len(cohort.split("test"))


# Metadata


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metadata_file_written(trained: TrainingReport, name: str) -> None:
    saved = json.loads((trained.models[name].directory / METADATA_NAME).read_text())
    assert saved == trained.models[name].metadata


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metadata_seed(trained: TrainingReport, name: str) -> None:
    assert trained.models[name].metadata["seed"] == TRAIN_SEED


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metadata_code_version(trained: TrainingReport, name: str) -> None:
    assert trained.models[name].metadata["code_version"]["clinfer"] == __version__


@pytest.mark.parametrize("name", (IMAGE_MODEL, EMR_MODEL, FUSION_MODEL))
def test_metadata_cohort_seed(trained: TrainingReport, name: str) -> None:
    data = trained.models[name].metadata["training_data"]
    assert data["cohort_seed"] == COHORT_SEED


@pytest.mark.parametrize("name", (IMAGE_MODEL, EMR_MODEL, FUSION_MODEL))
def test_metadata_cohort_size(trained: TrainingReport, name: str) -> None:
    data = trained.models[name].metadata["training_data"]
    assert data["cohort_size"] == COHORT_SIZE


def test_metadata_breast_cancer_source(trained: TrainingReport) -> None:
    data = trained.models[BREAST_CANCER_MODEL].metadata["training_data"]
    assert data["source"] == "sklearn breast_cancer"


@pytest.mark.parametrize("name", (EMR_MODEL, FUSION_MODEL))
def test_metadata_emr_features(trained: TrainingReport, name: str) -> None:
    assert trained.models[name].metadata["feature_names"] == list(EMR_FEATURES)


def test_metadata_breast_cancer_features(trained: TrainingReport) -> None:
    metadata = trained.models[BREAST_CANCER_MODEL].metadata
    assert len(metadata["feature_names"]) == 30


@pytest.mark.parametrize("name", (BREAST_CANCER_MODEL, EMR_MODEL, FUSION_MODEL))
def test_metadata_standardisation(trained: TrainingReport, name: str) -> None:
    metadata = trained.models[name].metadata
    sizes = {len(metadata["standardisation"][key]) for key in ("mean", "std")}
    assert sizes == {len(metadata["feature_names"])}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_metadata_test_auroc(trained: TrainingReport, name: str) -> None:
    assert 0.0 <= trained.models[name].test_metrics["auroc"] <= 1.0


# Reloading


def test_fusion_reloads_with_same_auroc(
    trained: TrainingReport, cohort: CohortManifest
) -> None:
    model, metadata = load_trained_model(trained.models[FUSION_MODEL].directory)
    emr = read_emr_csv(cohort.path_of("emr.csv"))
    patients = cohort.split("test")
    config = PreprocessConfig(height=224, width=224)
    images = np.stack(
        [
            load_and_preprocess(cohort.path_of(p.dicom_path), config).frames[0]
            for p in patients
        ]
    )
    features = [emr_features(emr[(p.patient_id, p.accession_number)]) for p in patients]
    with torch.no_grad():
        probabilities = model(
            torch.from_numpy(images), torch.tensor(features, dtype=torch.float32)
        )[:, 1].numpy()
    labels = np.array([patient.label for patient in patients])
    auroc = binary_metrics(labels, probabilities)["auroc"]
    assert auroc == pytest.approx(metadata["metrics"]["test"]["auroc"], abs=1e-9)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_reloads(trained: TrainingReport, name: str) -> None:
    _, metadata = load_trained_model(trained.models[name].directory)
    assert metadata == trained.models[name].metadata


def test_tampered_weights_rejected(trained: TrainingReport, tmp_path: Path) -> None:
    source = trained.models[EMR_MODEL].directory
    copy = tmp_path / "emr_copy"
    copy.mkdir()
    (copy / METADATA_NAME).write_bytes((source / METADATA_NAME).read_bytes())
    (copy / "model.pt").write_bytes((source / "model.pt").read_bytes() + b"\0")
    with pytest.raises(ConfigurationError, match="sha256"):
        load_trained_model(copy)


# Determinism


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_weights(
    tiny_runs: tuple[TrainingReport, ...], name: str
) -> None:
    first, second, _ = tiny_runs
    a, _ = load_trained_model(first.models[name].directory)
    b, _ = load_trained_model(second.models[name].directory)
    for (key, tensor), other in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(tensor, other), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_metrics(
    tiny_runs: tuple[TrainingReport, ...], name: str
) -> None:
    first, second, _ = tiny_runs
    assert (
        first.models[name].metadata["metrics"]
        == second.models[name].metadata["metrics"]
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_other_seed_other_weights(
    tiny_runs: tuple[TrainingReport, ...], name: str
) -> None:
    first, _, other = tiny_runs
    a, _ = load_trained_model(first.models[name].directory)
    b, _ = load_trained_model(other.models[name].directory)
    pairs = zip(a.state_dict().values(), b.state_dict().values())
    assert not all(torch.equal(x, y) for x, y in pairs)


def test_torch_settings_restored() -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with deterministic_torch(0, threads + 1):
        pass
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_tiny_config_used(tiny_runs: tuple[TrainingReport, ...]) -> None:
    epochs = tiny_runs[0].models[IMAGE_MODEL].metadata["epochs"]
    assert epochs == TINY_CONFIG.image_epochs


# Invalid input


def test_missing_cohort_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="manifest.json"):
        train_all(tmp_path / "missing", tmp_path / "models", seed=0)


def test_empty_split_rejected(tmp_path: Path) -> None:
    generate_cohort(1, tmp_path / "cohort", seed=0)
    with pytest.raises(ConfigurationError, match="has no patients"):
        train_all(tmp_path / "cohort", tmp_path / "models", seed=0, config=TINY_CONFIG)
