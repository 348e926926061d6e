"""The clinician page with the multimodal composition: EMR, heatmap toggle, screenshot."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import sync_playwright

from clinfer.gateway.app import GatewaySettings, create_app
from clinfer.gateway.auth import hash_token
from clinfer.server import EmbeddedTritonServer, free_port
from clinfer.train.cohort import EMR_CSV_NAME, CohortManifest
from clinfer.train.emr import EMR_FEATURES, emr_features, read_emr_csv

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TOKEN = "query-token-dana"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def gateway_url(mm_server: EmbeddedTritonServer, tmp_path: Path) -> Iterator[str]:
    tokens = {hash_token(TOKEN): {"user": "dana", "scopes": ["query"]}}
    (tmp_path / "tokens.json").write_text(json.dumps(tokens), encoding="utf-8")
    settings = GatewaySettings(
        triton_urls=[mm_server.grpc_url],
        tokens_file=tmp_path / "tokens.json",
        audit_log=tmp_path / "audit.jsonl",
        storage_root=tmp_path,
        model="multimodal",
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30.0
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10.0)


def test_page_toggles_heatmap(
    gateway_url: str, mm_cohort: CohortManifest, tmp_path: Path
) -> None:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} not found; install Debian's chromium"
    records = read_emr_csv(mm_cohort.root / EMR_CSV_NAME)
    patient = next(p for p in mm_cohort.split("test") if p.finding_present)
    record = records[(patient.patient_id, patient.accession_number)]
    emr = dict(zip(EMR_FEATURES, emr_features(record)))
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        page = context.new_page()
        page.goto(gateway_url + "/")
        page.fill("#token", TOKEN)
        page.fill("#emr", json.dumps(emr))
        page.set_input_files("#files", str(mm_cohort.path_of(patient.dicom_path)))
        page.click("#submit")
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        page.wait_for_function(
            "document.getElementById('image').complete && "
            "document.getElementById('image').naturalWidth > 0",
            timeout=30_000,
        )
        assert page.is_enabled("#heatmap-toggle")
        assert page.is_checked("#heatmap-toggle")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gateway-heatmap.png"), full_page=True)
        with_heatmap = page.get_attribute("#image", "src")
        page.click("#heatmap-toggle")
        without_heatmap = page.get_attribute("#image", "src")
        emr_text = page.inner_text("#emr-used")
        context.close()
    assert with_heatmap != without_heatmap
    assert "age_years" in emr_text
