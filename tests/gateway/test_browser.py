"""The web page in Debian's chromium, driven by Playwright, against a live gateway."""

from __future__ import annotations

from pathlib import Path

from pydicom.data import get_testdata_file

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
QUERY_TOKEN = "query-token-alice"


def test_page_scores_ct(page, live_gateway: str) -> None:
    page.goto(live_gateway + "/")
    page.fill("#token", QUERY_TOKEN)
    page.set_input_files("#files", get_testdata_file("CT_small.dcm"))
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    page.wait_for_function(
        "document.getElementById('image').complete && "
        "document.getElementById('image').naturalWidth > 0",
        timeout=30_000,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "gateway.png"), full_page=True)
    label_text = page.inner_text("#label-text")
    assert "score" in label_text
    assert page.is_visible("#banner")
    assert "qualified clinician" in page.inner_text("#banner")
    validation = page.inner_text("#validation")
    assert "no validation report for this model" in validation


def test_page_shows_bad_token(page, live_gateway: str) -> None:
    page.goto(live_gateway + "/")
    page.fill("#token", "wrong-token")
    page.set_input_files("#files", get_testdata_file("CT_small.dcm"))
    page.click("#submit")
    page.wait_for_selector("#status.error", timeout=30_000)
    assert "401" in page.inner_text("#status")
