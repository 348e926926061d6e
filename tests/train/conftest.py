"""Session fixtures: synthetic cohorts and the models trained on them, made once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from clinfer.train.cohort import CohortManifest, generate_cohort
from clinfer.train.emr import EmrRecord, read_emr_csv
from clinfer.train.training import TrainConfig, TrainingReport, train_all

# With 600 patients the test split has 142 patients (33 positive). A smaller split
# makes the test AUROC too noisy for the fusion threshold of 0.95.
COHORT_SIZE = 600
COHORT_SEED = 0
SMALL_SIZE = 12
TRAIN_SEED = 0
# Few epochs: the determinism tests compare weights, not quality.
TINY_CONFIG = TrainConfig(image_epochs=2, tabular_epochs=5, fusion_epochs=5)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortManifest:
    return generate_cohort(
        COHORT_SIZE, tmp_path_factory.mktemp("cohort"), seed=COHORT_SEED
    )


@pytest.fixture(scope="session")
def headers(cohort: CohortManifest) -> list[Dataset]:
    return [
        dcmread(cohort.path_of(patient.dicom_path), stop_before_pixels=True)
        for patient in cohort.patients
    ]


@pytest.fixture(scope="session")
def emr_rows(cohort: CohortManifest) -> dict[tuple[str, str], EmrRecord]:
    return read_emr_csv(cohort.path_of("emr.csv"))


@pytest.fixture(scope="session")
def bundles(cohort: CohortManifest) -> list[dict[str, Any]]:
    return [
        json.loads(cohort.path_of(patient.fhir_path).read_text(encoding="utf-8"))
        for patient in cohort.patients
    ]


@pytest.fixture(scope="session")
def small_cohorts(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CohortManifest, CohortManifest]:
    """Two cohorts generated with the seed of ``cohort`` into different folders."""
    first = generate_cohort(SMALL_SIZE, tmp_path_factory.mktemp("small_a"), seed=0)
    second = generate_cohort(SMALL_SIZE, tmp_path_factory.mktemp("small_b"), seed=0)
    return first, second


@pytest.fixture(scope="session")
def other_seed_cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortManifest:
    return generate_cohort(SMALL_SIZE, tmp_path_factory.mktemp("small_seed1"), seed=1)


@pytest.fixture(scope="session")
def trained(
    cohort: CohortManifest, tmp_path_factory: pytest.TempPathFactory
) -> TrainingReport:
    return train_all(cohort.root, tmp_path_factory.mktemp("models"), seed=TRAIN_SEED)


@pytest.fixture(scope="session")
def training_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-patient cohort for the quick training runs."""
    root = tmp_path_factory.mktemp("training_cohort")
    generate_cohort(60, root, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_runs(
    training_cohort: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainingReport, TrainingReport, TrainingReport]:
    """Two runs with seed 0 and one with seed 1, each with ``TINY_CONFIG``."""
    return tuple(
        train_all(
            training_cohort,
            tmp_path_factory.mktemp(f"tiny_{index}"),
            seed=seed,
            config=TINY_CONFIG,
        )
        for index, seed in enumerate((0, 0, 1))
    )
