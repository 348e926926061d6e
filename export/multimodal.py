"""Export the trained image, EMR, fusion and Wisconsin models and their composition.

``export_trained_models`` loads the models that ``clinfer train`` saved and exports
each to ONNX. Each export passes two parity gates: fresh random inputs and real
held-out inputs, with an fp32 max abs diff of at most ``tolerance``. Where TensorRT
and a GPU are present, an fp16 engine is built and checked. The models are then
published into a Triton model repository, followed by the BLS composition
``multimodal`` (``clinfer.export.composition``). By default the composition and the
models it calls also get ``_realtime`` copies at the same versions. A model that
fails a gate raises ``clinfer.errors.ParityError`` before anything is published.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from clinfer.export import tensorrt_engine
from clinfer.export.composition import (
    COMPOSING_MODELS,
    COMPOSITION_NAME,
    publish_composing_model,
    publish_composition,
)
from clinfer.export.onnx_export import DEFAULT_TOLERANCE
from clinfer.export.parity import (
    RANDOM_GATE,
    REAL_GATE,
    GateResult,
    check_gate,
    export_multi_onnx,
    random_batches,
)
from clinfer.export.saliency import CxrCnnWithSaliency
from clinfer.export.served_repository import (
    ServingOptions,
    publish_model,
    realtime_name,
)
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from torch import nn

from clinfer import __version__
from clinfer.errors import ConfigurationError
from clinfer.train.artifacts import load_trained_model
from clinfer.train.cohort import CohortManifest
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv
from clinfer.train.training import (
    BREAST_CANCER_MODEL,
    EMR_MODEL,
    FUSION_MODEL,
    IMAGE_MODEL,
    IMAGE_SIZE,
)

logger = logging.getLogger(__name__)

ONNX_HOST_SOURCE = Path(__file__).with_name("triton_onnx_model.py")
COMPOSED_HOST_SOURCE = Path(__file__).with_name("triton_composed_onnx_model.py")
REAL_BATCH_SIZE = 32
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
PROBABILITIES = "probabilities"
SALIENCY = "saliency"
# Parity tolerance of the saliency map, in its [0, 1] units. The map routes the
# gradient through each max pool's arg-max, so a rounding difference that flips a
# near-tie moves relevance to a neighbouring cell. On the 142 held-out images of a
# 600-patient cohort (cohort and training seed 0), PyTorch fp32 and fp64 maps
# differed by up to 5.7e-4, and ONNX Runtime and PyTorch fp32 maps by up to 7.6e-3.
# The probabilities agreed to 1.5e-6 and keep the 1e-4 gate.
SALIENCY_TOLERANCE = 5e-2


@dataclass
class ModelPlan:
    """One trained model prepared for export: wrapper module, tensors and spec."""

    name: str
    module: nn.Module
    inputs: dict[str, tuple[int, ...]]
    outputs: list[dict[str, Any]]
    spec: dict[str, Any]
    centres: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    output_tolerances: dict[str, float] = field(default_factory=dict)

    @property
    def output_names(self) -> list[str]:
        return [output["name"] for output in self.outputs]


@dataclass(frozen=True)
class RealInputs:
    """Held-out inputs of one model in batches, with the labels of the samples."""

    batches: list[dict[str, np.ndarray]]
    labels: np.ndarray
    source: str


@dataclass
class ModelExport:
    """Exported ONNX file of one model and the outcome of its gates."""

    plan: ModelPlan
    onnx_path: Path
    gates: list[GateResult]
    tensorrt: tensorrt_engine.TensorRtResult | None = None
    engine_path: Path | None = None
    version: int | None = None
    created: bool | None = None


@dataclass
class ExportReport:
    """Everything ``export_trained_models`` exported and published."""

    repository: Path
    models: dict[str, ModelExport]
    composition_version: int
    composition_created: bool
    realtime_copies: list[str] = field(default_factory=list)
    """Real-time copies published at the versions of their batch models."""

    def rows(self) -> list[dict[str, Any]]:
        """Return one summary row per model for tables and JSON."""
        rows = []
        for name, export in self.models.items():
            gates = {gate.gate: gate for gate in export.gates}
            trt = export.tensorrt
            rows.append(
                {
                    "model": name,
                    "version": export.version,
                    "created": export.created,
                    "random_max_abs_diff": gates[RANDOM_GATE].per_output,
                    "real_max_abs_diff": gates[REAL_GATE].per_output,
                    "real_samples": gates[REAL_GATE].samples,
                    "tensorrt": trt.status if trt else "not requested",
                    "tensorrt_reason": trt.reason if trt else "",
                    "tensorrt_max_abs_diff": trt.max_abs_diff if trt else None,
                    "tensorrt_auroc_delta": trt.auroc_delta if trt else None,
                }
            )
        return rows


def _tensor(name: str, dims: list[int], description: str, **extra: Any) -> dict:
    return {"name": name, "dims": dims, "description": description, **extra}


PROBABILITY_OUTPUT = _tensor(
    PROBABILITIES,
    [2],
    "softmax probabilities of (negative, positive), labels in labels.txt",
    labels=True,
)
SALIENCY_OUTPUT = _tensor(
    SALIENCY,
    [IMAGE_SIZE, IMAGE_SIZE],
    "gradient x activation map of the positive logit at the 28x28 encoder layer, "
    "interpolated to the 224x224 preprocessed input and scaled to [0, 1] "
    "(clinfer.export.saliency.CxrCnnWithSaliency)",
)
IMAGE_TENSOR = _tensor(
    "image",
    list(IMAGE_SHAPE),
    "preprocessed radiograph in [0, 1], 1 bright (clinfer.workers.preprocess."
    "load_and_preprocess at 224x224: zero pad to square, bilinear resize)",
)
EMR_TENSOR = _tensor(
    "emr",
    [len(EMR_FEATURES)],
    "raw EMR values in this order: "
    + ", ".join(EMR_FEATURES)
    + "; standardised inside the model with the training mean and std",
)


def _base_spec(
    name: str, metadata: dict[str, Any], inputs: list[dict], outputs: list[dict]
) -> dict[str, Any]:
    return {
        "schema": 1,
        "name": name,
        "task": metadata["task"],
        "labels": list(metadata["labels"]),
        "positive_label": metadata["positive_label"],
        "threshold": 0.5,
        "inputs": inputs,
        "outputs": outputs,
        "training": {
            "status": "trained",
            "note": "trained on synthetic data only; not for clinical use",
            "seed": metadata["seed"],
            "weights_sha256": metadata["weights_sha256"],
            "code_version": metadata["code_version"],
            "test_metrics": metadata["metrics"]["test"],
            "training_data": metadata.get("training_data", {}),
        },
    }


def _tabular_stats(metadata: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    stats = metadata["standardisation"]
    mean = np.asarray(stats["mean"], dtype=np.float64)
    std = np.asarray(stats["std"], dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def _load(models_dir: Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    return load_trained_model(Path(models_dir) / name)


def build_plans(models_dir: Path) -> dict[str, ModelPlan]:
    """Load the four trained models and wrap each for export.

    Raises
    ------
    ConfigurationError
        If a model folder is missing or its metadata or weights are invalid.
    """
    plans = {}
    image_model, metadata = _load(models_dir, IMAGE_MODEL)
    spec = _base_spec(IMAGE_MODEL, metadata, [IMAGE_TENSOR], [])
    spec["outputs"] = [PROBABILITY_OUTPUT, SALIENCY_OUTPUT]
    # The keys read by clinfer.client.triton.ModelSpec, so the DICOM scoring
    # pipeline can score this model by name.
    spec.update(
        {
            "input": {
                "name": "image",
                "channels": 1,
                "height": IMAGE_SIZE,
                "width": IMAGE_SIZE,
                "range": [0.0, 1.0],
            },
            "output": {"name": PROBABILITIES, "kind": "softmax"},
            "accepts": {
                "modalities": ["CR", "DX"],
                "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
                "samples_per_pixel": [1],
            },
        }
    )
    plans[IMAGE_MODEL] = ModelPlan(
        IMAGE_MODEL,
        CxrCnnWithSaliency(image_model).eval(),
        {"image": IMAGE_SHAPE},
        spec["outputs"],
        spec,
        output_tolerances={SALIENCY: SALIENCY_TOLERANCE},
    )

    for name, input_tensor in (
        (EMR_MODEL, EMR_TENSOR),
        (BREAST_CANCER_MODEL, None),
    ):
        model, metadata = _load(models_dir, name)
        if input_tensor is None:
            features = metadata["feature_names"]
            input_tensor = _tensor(
                "features",
                [len(features)],
                "raw breast-cancer Wisconsin features in sklearn order: "
                + ", ".join(features),
            )
        mean, std = _tabular_stats(metadata)
        spec = _base_spec(name, metadata, [input_tensor], [PROBABILITY_OUTPUT])
        plans[name] = ModelPlan(
            name,
            model,
            {input_tensor["name"]: (len(mean),)},
            [PROBABILITY_OUTPUT],
            spec,
            centres={input_tensor["name"]: mean},
            scales={input_tensor["name"]: std},
        )

    model, metadata = _load(models_dir, FUSION_MODEL)
    mean, std = _tabular_stats(metadata)
    spec = _base_spec(
        FUSION_MODEL, metadata, [IMAGE_TENSOR, EMR_TENSOR], [PROBABILITY_OUTPUT]
    )
    plans[FUSION_MODEL] = ModelPlan(
        FUSION_MODEL,
        model,
        {"image": IMAGE_SHAPE, "emr": (len(mean),)},
        [PROBABILITY_OUTPUT],
        spec,
        centres={"emr": mean},
        scales={"emr": std},
    )
    return plans


def apply_validated_thresholds(
    plans: Mapping[str, ModelPlan], validation_dir: Path
) -> dict[str, float]:
    """Set each plan's served threshold to its validation report's operating point.

    ``clinfer validate`` picks the threshold on the validation split and writes it
    to ``<validation_dir>/<model>/report.json``. A report is used only when its
    weights SHA-256 matches the plan's trained weights; a model without a matching
    report keeps the threshold 0.5. The spec records where the threshold came from.

    Returns
    -------
    dict
        {model name: threshold} of the plans whose threshold was set.

    Raises
    ------
    ConfigurationError
        If a report exists but is not valid JSON or has no threshold value.
    """
    applied = {}
    for name, plan in plans.items():
        path = Path(validation_dir) / name / "report.json"
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            threshold = float(data["threshold"]["value"])
            weights = data["model"]["weights_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"validation report {path} has no readable threshold ({exc}); "
                "rerun `clinfer validate` for this model"
            ) from exc
        trained = plan.spec["training"]["weights_sha256"]
        if weights != trained:
            logger.warning(
                "validation report %s is for other weights of %s (%s, trained %s); "
                "keeping threshold %.3f",
                path,
                name,
                weights[:12],
                trained[:12],
                plan.spec["threshold"],
            )
            continue
        plan.spec["threshold"] = threshold
        plan.spec["threshold_source"] = {
            "report": f"{name}/report.json",
            "rule": data["threshold"].get("rule"),
            "decision": data.get("decision", {}).get("overall"),
        }
        applied[name] = threshold
    return applied


def _chunks(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    total = len(next(iter(arrays.values())))
    return [
        {name: value[start : start + size] for name, value in arrays.items()}
        for start in range(0, total, size)
    ]


def cohort_inputs(cohort_dir: Path, split: str = "test") -> dict[str, np.ndarray]:
    """Preprocess the images and read the EMR rows of one split of a cohort.

    Returns ``image`` (N, 1, 224, 224), ``emr`` (N, features) raw values,
    ``label`` and ``finding`` (N,) int64, in manifest order.

    Raises
    ------
    ConfigurationError
        If the manifest or EMR table is missing, or a patient has no EMR row.
    clinfer.errors.DicomInputError
        If an image cannot be decoded or preprocessed.
    """
    manifest = CohortManifest.load(Path(cohort_dir))
    patients = manifest.split(split)
    if not patients:
        raise ConfigurationError(
            f"the {split} split of cohort {cohort_dir} has no patients; generate a "
            "larger cohort"
        )
    emr_path = manifest.path_of("emr.csv")
    try:
        emr = read_emr_csv(emr_path)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read the EMR table {emr_path}: {exc}; regenerate the cohort"
        ) from exc
    config = PreprocessConfig(height=IMAGE_SIZE, width=IMAGE_SIZE)
    images, rows = [], []
    for patient in patients:
        key = (patient.patient_id, patient.accession_number)
        if key not in emr:
            raise ConfigurationError(
                f"{emr_path} has no row for patient index {patient.index}; "
                "regenerate the cohort"
            )
        frames = load_and_preprocess(manifest.path_of(patient.dicom_path), config)
        images.append(frames.frames[0])
        rows.append(emr_features(emr[key]))
    return {
        "image": np.stack(images).astype(np.float32),
        "emr": np.asarray(rows, dtype=np.float32),
        "label": np.asarray([p.label for p in patients], dtype=np.int64),
        "finding": np.asarray([int(p.finding_present) for p in patients]),
    }


def wisconsin_test_inputs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the held-out Wisconsin features and labels of training seed ``seed``.

    The split repeats ``clinfer.train.training.train_breast_cancer``: stratified,
    25 % test, ``random_state=seed``; label 1 is malignant.
    """
    data = load_breast_cancer()
    labels = (data.target == 0).astype(np.int64)
    indices = np.arange(len(labels))
    _, test = train_test_split(
        indices, test_size=0.25, stratify=labels, random_state=seed
    )
    return data.data[test].astype(np.float32), labels[test]


def real_inputs(
    plans: Mapping[str, ModelPlan], cohort: Mapping[str, np.ndarray]
) -> dict[str, RealInputs]:
    """Split held-out inputs into batches for every plan.

    The labels are ``finding_present`` for the image model (its training target)
    and the cohort label for the EMR and fusion models. The Wisconsin model gets
    its own held-out split.
    """
    result = {}
    for name, plan in plans.items():
        if name == BREAST_CANCER_MODEL:
            features, labels = wisconsin_test_inputs(plan.spec["training"]["seed"])
            arrays = {"features": features}
            source = "sklearn breast_cancer test split"
        else:
            arrays = {key: cohort[key] for key in plan.inputs}
            labels = cohort["finding" if name == IMAGE_MODEL else "label"]
            source = "cohort test split"
        result[name] = RealInputs(_chunks(arrays, REAL_BATCH_SIZE), labels, source)
    return result


def export_and_gate(
    plan: ModelPlan,
    onnx_path: Path,
    real: RealInputs,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int | None = None,
    exported_module: nn.Module | None = None,
) -> ModelExport:
    """Export ``plan`` (or ``exported_module``) to ONNX and run both parity gates.

    The gates always compare with ``plan.module``; ``exported_module`` lets a
    caller export a different module, which the gates must then reject if its
    outputs differ.

    Raises
    ------
    clinfer.errors.ParityError
        If the random-input or the real-input gate fails.
    clinfer.errors.ExportError
        If the ONNX export fails.
    """
    batches, seed = random_batches(
        plan.inputs, seed=seed, centres=plan.centres, scales=plan.scales
    )
    module = plan.module if exported_module is None else exported_module
    export_multi_onnx(
        module, onnx_path, examples=batches[1], output_names=plan.output_names
    )
    gates = [
        check_gate(
            plan.name,
            plan.module,
            onnx_path,
            batches,
            gate=RANDOM_GATE,
            tolerance=tolerance,
            output_tolerances=plan.output_tolerances,
            seed=seed,
        ),
        check_gate(
            plan.name,
            plan.module,
            onnx_path,
            real.batches,
            gate=REAL_GATE,
            tolerance=tolerance,
            output_tolerances=plan.output_tolerances,
        ),
    ]
    return ModelExport(plan, onnx_path, gates)


def _tensorrt_step(
    export: ModelExport, real: RealInputs, options: ServingOptions
) -> None:
    reason = tensorrt_engine.tensorrt_unavailable_reason()
    if reason:
        export.tensorrt = tensorrt_engine.skipped(export.plan.name, reason)
        return
    engine_path = export.onnx_path.with_suffix(".plan")
    tensorrt_engine.build_engine(
        export.onnx_path,
        engine_path,
        export.plan.inputs,
        max_batch_size=options.max_batch_size,
    )
    export.tensorrt = tensorrt_engine.check_engine(
        export.plan.name, export.onnx_path, engine_path, real.batches, real.labels
    )
    if export.tensorrt.status == tensorrt_engine.PASSED:
        export.engine_path = engine_path


def _version_info(export: ModelExport) -> dict[str, Any]:
    return {
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "clinfer_version": __version__,
        "parity": [gate.to_json() for gate in export.gates],
        "tensorrt": export.tensorrt.to_json() if export.tensorrt else None,
        "torch": torch.__version__,
    }


def _version_files(export: ModelExport) -> dict[str, bytes]:
    files = {
        "model.onnx": export.onnx_path.read_bytes(),
        "model.py": COMPOSED_HOST_SOURCE.read_bytes(),
        "onnx_host.py": ONNX_HOST_SOURCE.read_bytes(),
    }
    if export.engine_path is not None:
        files["model.plan"] = export.engine_path.read_bytes()
    return files


def export_trained_models(
    models_dir: Path,
    cohort_dir: Path,
    repository: Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int | None = None,
    tensorrt: bool = True,
    options: ServingOptions | None = None,
    on_export: Callable[[ModelExport], None] | None = None,
    validation_dir: Path | None = None,
) -> ExportReport:
    """Export, gate and publish the four trained models and the composition.

    Parameters
    ----------
    models_dir
        Output folder of ``clinfer train``.
    cohort_dir
        The cohort the models were trained on; its test split feeds the
        real-input gates and the TensorRT AUROC check.
    repository
        Triton model repository to publish into.
    tolerance
        Maximum absolute fp32 difference between ONNX Runtime and PyTorch.
    seed
        Seed of the random-input gate; a fresh one is drawn when None.
    tensorrt
        Build and check TensorRT fp16 engines where TensorRT and a GPU are present;
        elsewhere the step is recorded as skipped with the reason.
    options
        Batching and instance options of the configs.
    on_export
        Called with each model's export after its gates pass.
    validation_dir
        Output folder of ``clinfer validate``; each model whose report matches its
        weights is served at the report's threshold (see
        :func:`apply_validated_thresholds`), the composition at the fusion model's.

    Returns
    -------
    ExportReport
        Parity figures, TensorRT outcome and published versions per model.

    Raises
    ------
    clinfer.errors.ParityError
        If any model fails a gate; nothing is published then.
    ConfigurationError
        If a trained model or the cohort is missing or invalid.
    clinfer.errors.ExportError
        If an export, an engine build or a write to the repository fails.
    """
    options = options or ServingOptions()
    plans = build_plans(models_dir)
    if validation_dir is not None:
        apply_validated_thresholds(plans, validation_dir)
    cohort = cohort_inputs(cohort_dir)
    real = real_inputs(plans, cohort)
    repository = Path(repository)
    with tempfile.TemporaryDirectory(prefix="clinfer-export-") as tmp:
        exports = {}
        for name, plan in plans.items():
            export = export_and_gate(
                plan,
                Path(tmp) / f"{name}.onnx",
                real[name],
                tolerance=tolerance,
                seed=seed,
            )
            if tensorrt:
                _tensorrt_step(export, real[name], options)
            if on_export is not None:
                on_export(export)
            exports[name] = export
        # Publishing starts only after every model passed its gates. The models
        # and their real-time copies precede the composition that calls them.
        for name, export in exports.items():
            publish = (
                publish_composing_model if name in COMPOSING_MODELS else publish_model
            )
            export.version, export.created = publish(
                repository,
                export.plan.spec,
                _version_files(export),
                version_info=_version_info(export),
                options=options,
            )
    versions = {name: export.version for name, export in exports.items()}
    composition_version, composition_created = publish_composition(
        repository, {name: plans[name].spec for name in plans}, versions, options
    )
    copies = []
    if options.realtime_models:
        copies = [realtime_name(n) for n in (*COMPOSING_MODELS, COMPOSITION_NAME)]
    return ExportReport(
        repository, exports, composition_version, composition_created, copies
    )
