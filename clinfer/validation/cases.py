"""Evaluation cases per split and in-process PyTorch predictions for them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

from clinfer.errors import ConfigurationError, DicomInputError, ValidationError
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import emr_features, read_emr_csv
from clinfer.train.training import IMAGE_SIZE
from clinfer.validation.metrics import age_band
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess

logger = logging.getLogger(__name__)

EVALUATION_SPLITS = ("validation", "test")
PREDICTION_BATCH = 64


@dataclass
class SplitCases:
    """The cases of one split: ids, labels, model inputs and subgroup attributes.

    ``case_ids`` are manifest patient indices or Wisconsin sample indices, never
    patient identifiers. ``images`` is float32 (N, 1, 224, 224) and is None when no
    model that reads images is validated. ``attributes`` maps a subgroup attribute
    (``sex``, ``age_band``, ``manufacturer``, ``view_position``) to each case's
    value; it is empty for data sets that record none of them.
    """

    split: str
    case_ids: list[int]
    labels: np.ndarray
    features: np.ndarray
    images: np.ndarray | None = None
    attributes: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.case_ids)


def load_cohort_cases(
    cohort_dir: Path, *, with_images: bool, splits: Sequence[str] = EVALUATION_SPLITS
) -> dict[str, SplitCases]:
    """Read the validation and test cases of a synthetic cohort.

    Images go through ``load_and_preprocess`` at 224 x 224, as in training and
    scoring. EMR rows are joined on (PatientID, AccessionNumber); sex and age for
    the subgroups come from the EMR row, manufacturer and view position from the
    manifest.

    Raises
    ------
    ConfigurationError
        If the manifest or EMR table is missing or invalid, a patient has no EMR
        row, or a split has no patients.
    ValidationError
        If a cohort image cannot be decoded or preprocessed.
    """
    manifest = CohortManifest.load(Path(cohort_dir))
    emr_path = manifest.path_of(EMR_CSV_NAME)
    try:
        emr = read_emr_csv(emr_path)
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"EMR table {emr_path} not found; regenerate the cohort"
        ) from exc
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc

    config = PreprocessConfig(height=IMAGE_SIZE, width=IMAGE_SIZE)
    cases = {}
    for name in splits:
        patients = manifest.split(name)
        if not patients:
            raise ConfigurationError(
                f"the {name} split of cohort {manifest.root} has no patients; "
                "generate a larger cohort"
            )
        rows = []
        attributes: dict[str, list[str]] = {
            "sex": [],
            "age_band": [],
            "manufacturer": [],
            "view_position": [],
        }
        for patient in patients:
            record = emr.get((patient.patient_id, patient.accession_number))
            if record is None:
                raise ConfigurationError(
                    f"{emr_path} has no row for patient index {patient.index}; "
                    "regenerate the cohort"
                )
            rows.append(emr_features(record))
            attributes["sex"].append(record.sex)
            attributes["age_band"].append(age_band(record.age_years))
            attributes["manufacturer"].append(patient.manufacturer)
            attributes["view_position"].append(patient.view_position)
        images = None
        if with_images:
            try:
                images = np.stack(
                    [
                        load_and_preprocess(
                            manifest.path_of(p.dicom_path), config
                        ).frames[0]
                        for p in patients
                    ]
                )
            except (DicomInputError, OSError) as exc:
                raise ValidationError(
                    f"a {name} image of cohort {manifest.root} could not be read: {exc}"
                ) from exc
        cases[name] = SplitCases(
            split=name,
            case_ids=[patient.index for patient in patients],
            labels=np.asarray([patient.label for patient in patients], dtype=np.int64),
            features=np.asarray(rows, dtype=np.float32),
            images=images,
            attributes=attributes,
        )
    logger.info(
        "Loaded %s cases of cohort %s",
        ", ".join(f"{len(c)} {n}" for n, c in cases.items()),
        manifest.root,
    )
    return cases


def load_wisconsin_cases(metadata: dict[str, Any]) -> dict[str, SplitCases]:
    """Rebuild the validation and test splits of the breast-cancer Wisconsin model.

    The split repeats ``clinfer.train.training.train_breast_cancer``: stratified
    ``train_test_split`` with ``random_state`` = the training seed, 25 % test, then
    20 % of the rest validation. Label 1 is malignant.

    Raises
    ------
    ValidationError
        If the rebuilt split sizes differ from those in the model's metadata.
    """
    seed = int(metadata["seed"])
    data = load_breast_cancer()
    features = data.data.astype(np.float32)
    labels = (data.target == 0).astype(np.int64)
    indices = np.arange(len(labels))
    rest, test = train_test_split(
        indices, test_size=0.25, stratify=labels, random_state=seed
    )
    _, validation = train_test_split(
        rest, test_size=0.2, stratify=labels[rest], random_state=seed
    )
    recorded = metadata.get("training_data", {}).get("split_sizes", {})
    cases = {}
    for name, index in (("validation", validation), ("test", test)):
        if recorded.get(name) not in (None, len(index)):
            raise ValidationError(
                f"the rebuilt Wisconsin {name} split has {len(index)} samples but "
                f"the model metadata records {recorded[name]}; the split rule of "
                "training changed, so retrain or update the validation split rule"
            )
        cases[name] = SplitCases(
            split=name,
            case_ids=[int(i) for i in index],
            labels=labels[index],
            features=features[index],
        )
    return cases


def input_names(metadata: dict[str, Any]) -> list[str]:
    """Return the model's input names from its metadata (``image``, ``emr``...)."""
    return [item["name"] for item in metadata.get("inputs", [])]


def predict_probabilities(
    model: nn.Module, metadata: dict[str, Any], cases: SplitCases
) -> np.ndarray:
    """Return the positive-class probability of each case with the PyTorch model.

    The inputs follow ``metadata["inputs"]``: ``image`` takes ``cases.images``;
    ``emr`` and ``features`` take ``cases.features``.

    Raises
    ------
    ValidationError
        If the model needs images that were not loaded, or an input name is
        unknown.
    """
    tensors = []
    for name in input_names(metadata):
        if name == "image":
            if cases.images is None:
                raise ValidationError(
                    f"model {metadata['name']} needs images, but the {cases.split} "
                    "cases were loaded without them"
                )
            tensors.append(torch.from_numpy(cases.images))
        elif name in ("emr", "features"):
            tensors.append(torch.from_numpy(cases.features))
        else:
            raise ValidationError(
                f"model {metadata['name']} has input {name!r}, which validation "
                "cannot supply"
            )
    outputs = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(cases), PREDICTION_BATCH):
            chunk = [tensor[start : start + PREDICTION_BATCH] for tensor in tensors]
            outputs.append(model(*chunk)[:, 1])
    return torch.cat(outputs).numpy().astype(np.float64)
