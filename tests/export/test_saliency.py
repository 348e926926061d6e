"""Saliency maps of the image model: correctness, alignment and the served path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from clinfer.export.composition import infer_multimodal
from clinfer.export.multimodal import ModelPlan, cohort_inputs
from clinfer.export.saliency import (
    CxrCnnWithSaliency,
    box_to_input,
    input_to_original,
    original_to_input,
    peak_in_box,
    write_overlay_png,
)
from PIL import Image

from clinfer.server import EmbeddedTritonServer
from clinfer.train.cohort import CohortManifest

# With the 400-patient cohort of conftest.py, 87 % of the held-out images with a
# finding had their saliency peak inside a finding box (96 % with 600 patients).
MIN_HIT_FRACTION = 0.7


def _autograd_saliency(
    wrapper: CxrCnnWithSaliency, image: torch.Tensor
) -> torch.Tensor:
    model = wrapper.model
    layer_index = wrapper.attribution_layer
    x = (image - model.input_mean) / model.input_std
    for layer in model.encoder[: layer_index + 1]:
        x = layer(x)
    activations = x.detach().requires_grad_(True)
    x = activations
    for layer in model.encoder[layer_index + 1 :]:
        x = layer(x)
    logits = model.classifier(torch.flatten(model.pool(x), 1))
    (logits[:, 1] - logits[:, 0]).sum().backward()
    relevance = torch.relu((activations.grad * activations).sum(dim=1)).detach()
    upsampled = wrapper.upsample @ relevance @ wrapper.upsample.T
    return upsampled / upsampled.amax(dim=(1, 2), keepdim=True)


@pytest.fixture(scope="module")
def image_plan(mm_plans: dict[str, ModelPlan]) -> ModelPlan:
    return mm_plans["cxr_cnn"]


def test_saliency_matches_autograd(
    image_plan: ModelPlan, mm_test_inputs: dict[str, np.ndarray]
) -> None:
    wrapper = image_plan.module
    image = torch.from_numpy(mm_test_inputs["image"][:8])
    with torch.no_grad():
        _, saliency = wrapper(image)
    expected = _autograd_saliency(wrapper, image)
    assert float((saliency - expected).abs().max()) <= 1e-5


def test_wrapper_probabilities_match_model(
    image_plan: ModelPlan, mm_test_inputs: dict[str, np.ndarray]
) -> None:
    image = torch.from_numpy(mm_test_inputs["image"][:8])
    with torch.no_grad():
        probabilities, _ = image_plan.module(image)
        expected = image_plan.module.model(image)
    assert float((probabilities - expected).abs().max()) <= 1e-6


def test_cam_is_weighted_last_maps(
    image_plan: ModelPlan, mm_test_inputs: dict[str, np.ndarray]
) -> None:
    cam = CxrCnnWithSaliency(image_plan.module.model, method="cam")
    image = torch.from_numpy(mm_test_inputs["image"][:4])
    model = cam.model
    with torch.no_grad():
        _, saliency = cam(image)
        maps = model.encoder((image - model.input_mean) / model.input_std)
        weights = model.classifier.weight[1] - model.classifier.weight[0]
        relevance = torch.relu(torch.einsum("nkhw,k->nhw", maps, weights))
        upsampled = cam.upsample @ relevance @ cam.upsample.T
        # A map without positive evidence is all 0 and stays 0.
        peak = upsampled.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6)
        expected = upsampled / peak
    assert float((saliency - expected).abs().max()) <= 1e-5


def test_attribution_grid_alignment(image_plan: ModelPlan) -> None:
    # 224 -> average pool -> 112 -> three 2x2 max pools -> 28 cells, 8 pixels apart;
    # cell 0 covers input pixels 0-7, centred at 4.
    geometry = image_plan.module.geometry
    assert (geometry.offset, geometry.step, geometry.size) == (4.0, 8.0, 28)


def test_box_maps_through_padding() -> None:
    # 352 rows x 288 columns: padded by 32 columns each side to 352, scale 224/352.
    box = box_to_input((0, 0, 352, 288), 352, 288)
    assert box == pytest.approx((0.0, 32 * 224 / 352, 224.0, 320 * 224 / 352))


def test_coordinates_round_trip() -> None:
    row, col = original_to_input(100.0, 40.0, 320, 256)
    assert input_to_original(row, col, 320, 256) == pytest.approx((100.0, 40.0))


def test_peak_in_box() -> None:
    saliency = np.zeros((224, 224), dtype=np.float32)
    saliency[50, 60] = 1.0
    assert peak_in_box(saliency, (50.0, 60.0, 51.0, 61.0))


def test_peak_outside_box() -> None:
    saliency = np.zeros((224, 224), dtype=np.float32)
    saliency[50, 60] = 1.0
    assert not peak_in_box(saliency, (0.0, 0.0, 50.0, 224.0))


def test_overlay_png_size(tmp_path: Path) -> None:
    image = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(1, 224, 224)
    saliency = np.zeros((224, 224), dtype=np.float32)
    path = write_overlay_png(image, saliency, tmp_path / "overlay.png")
    with Image.open(path) as png:
        assert (png.mode, png.size) == ("RGB", (224, 224))


def test_overlay_rejects_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be one 2-D shape"):
        write_overlay_png(
            np.zeros((224, 224)), np.zeros((112, 112)), tmp_path / "x.png"
        )


def test_served_saliency_peaks_in_findings(
    mm_server: EmbeddedTritonServer, mm_cohort: CohortManifest
) -> None:
    client = triton_grpc.InferenceServerClient(mm_server.grpc_url)
    hits = []
    for split in ("validation", "test"):
        inputs = cohort_inputs(mm_cohort.root, split)
        patients = mm_cohort.split(split)
        chosen = [i for i, patient in enumerate(patients) if patient.finding_present]
        for start in range(0, len(chosen), 16):
            batch = chosen[start : start + 16]
            result = infer_multimodal(
                client, inputs["image"][batch], inputs["emr"][batch]
            )
            for index, saliency in zip(batch, result.saliency):
                patient = patients[index]
                boxes = [
                    box_to_input(f.box, patient.rows, patient.columns)
                    for f in patient.findings
                ]
                hits.append(any(peak_in_box(saliency, box) for box in boxes))
    assert np.mean(hits) >= MIN_HIT_FRACTION
