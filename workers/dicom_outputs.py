"""Write a DICOM SR and a heatmap Secondary Capture per scored study.

Runs after the scoring stage of a job, on the studies of the model version that have
no outputs yet, so a rerun after a kill writes what is missing. The Secondary
Capture's heatmap comes from the served model's saliency output: the study's
highest-scoring instance is sent once more to Triton with that output requested.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from clinfer.client.triton import ModelSpec, TritonModelClient
from clinfer.workers.preprocess import PreprocessConfig, load_and_preprocess
from clinfer.workers.results import ResultStore

from clinfer.dicom_out import (
    ModelResult,
    write_heatmap_capture,
    write_structured_report,
)
from clinfer.errors import ClinferError
from clinfer.privacy import short_hash

logger = logging.getLogger(__name__)


def write_study_outputs(
    store: ResultStore,
    spec: ModelSpec,
    url: str,
    out_dir: Path,
    *,
    priority: int,
) -> int:
    """Write the outputs of every study without them; return how many were written.

    The saliency map is the image model's and does not depend on the EMR input, so
    the saliency request sends zeros as EMR values.

    Raises
    ------
    ClinferError
        If Triton fails the saliency request or an output cannot be written.
    """
    client = TritonModelClient(url, spec.name, spec.version)
    config = PreprocessConfig(height=spec.height, width=spec.width)
    written = 0
    try:
        for study_uid, score in store.studies_without_outputs():
            folder = Path(out_dir) / short_hash(study_uid)
            instances = store.study_instances(study_uid)
            sources = [
                pydicom.dcmread(path, stop_before_pixels=True)
                for path, _, _ in instances
            ]
            result = ModelResult.from_score(
                model_name=spec.name,
                model_version=spec.version,
                weights_sha256=spec.sha256,
                score=score,
                threshold=spec.threshold,
            )
            sr_path = write_structured_report(sources, result, folder / "sr.dcm")
            sc_path = None
            if spec.saliency_output and spec.emr_input:
                best_path = instances[0][0]
                frame = load_and_preprocess(best_path, config).frames[:1]
                emr = np.zeros((1, spec.emr_size), dtype=np.float32)
                outputs = client.infer_multimodal(
                    frame, emr, spec, priority=priority, saliency=True
                )
                heatmap = outputs[spec.saliency_output][0]
                sc_path = write_heatmap_capture(
                    pydicom.dcmread(best_path),
                    frame[0],
                    heatmap,
                    result,
                    folder / "sc.dcm",
                )
            store.record_outputs(
                study_uid, str(sr_path), str(sc_path) if sc_path else None
            )
            written += 1
    except (OSError, ValueError) as exc:
        raise ClinferError(f"writing DICOM outputs to {out_dir} failed: {exc}") from exc
    finally:
        client.close()
    logger.info("DICOM outputs written for %d studies in %s", written, out_dir)
    return written
