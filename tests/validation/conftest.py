"""Session fixtures: a small synthetic cohort, models trained once, their reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from clinfer.train.cohort import CohortManifest, generate_cohort
from clinfer.train.training import TrainConfig, TrainingReport, train_all
from clinfer.validation.report import ValidationReport, validate_all

# 240 patients give a test split of about 50 cases: enough for every metric, and
# the image preprocessing stays short. Metric quality is not under test here.
COHORT_SIZE = 240
COHORT_SEED = 5
SHORT_CONFIG = TrainConfig(image_epochs=6, tabular_epochs=60, fusion_epochs=60)


@pytest.fixture(scope="session")
def validation_cohort(tmp_path_factory: pytest.TempPathFactory) -> CohortManifest:
    return generate_cohort(
        COHORT_SIZE, tmp_path_factory.mktemp("validation_cohort"), seed=COHORT_SEED
    )


@pytest.fixture(scope="session")
def validation_models(
    validation_cohort: CohortManifest, tmp_path_factory: pytest.TempPathFactory
) -> TrainingReport:
    return train_all(
        validation_cohort.root,
        tmp_path_factory.mktemp("validation_models"),
        seed=0,
        config=SHORT_CONFIG,
    )


@pytest.fixture(scope="session")
def models_root(validation_models: TrainingReport) -> Path:
    return next(iter(validation_models.models.values())).directory.parent


@pytest.fixture(scope="session")
def reports(
    models_root: Path,
    validation_cohort: CohortManifest,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, ValidationReport]:
    out = tmp_path_factory.mktemp("validation_reports")
    written = validate_all(models_root, out, cohort_dir=validation_cohort.root)
    return {report.model_name: report for report in written}
