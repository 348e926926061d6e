"""Gateway parts that need no server: EMR checks, PNG rendering, tokens, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from clinfer.errors import ConfigurationError, QueryError
from clinfer.gateway import images
from clinfer.gateway.app import _check_emr_fields, parse_emr
from clinfer.gateway.auth import load_tokens
from clinfer.gateway.cli import register


def test_emr_missing_field_named() -> None:
    with pytest.raises(QueryError, match="'age'"):
        _check_emr_fields({"sex": 1}, ["age", "sex"])


def test_emr_non_numeric_field_named() -> None:
    with pytest.raises(QueryError, match="'sex'"):
        _check_emr_fields({"age": 60, "sex": "female"}, ["age", "sex"])


def test_emr_numeric_strings_accepted() -> None:
    _check_emr_fields({"age": "60", "sex": 1}, ["age", "sex"])


def test_emr_empty_text_is_none() -> None:
    assert parse_emr("  ") is None


def test_overlay_marks_hot_region() -> None:
    frame = np.full((1, 32, 32), 0.5, dtype=np.float32)
    saliency = np.zeros((8, 8), dtype=np.float32)
    saliency[0:2, 0:2] = 1.0
    pixels = np.asarray(Image.open(io.BytesIO(images.overlay_png(frame, saliency))))
    assert pixels.shape == (32, 32, 3)
    assert pixels[0, 0, 0] > pixels[0, 0, 1]
    assert pixels[31, 31, 0] == pixels[31, 31, 1]


def test_frame_png_is_grey() -> None:
    frame = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    pixels = np.asarray(Image.open(io.BytesIO(images.frame_png(frame))))
    assert pixels[3, 3, 0] == 255


def test_tokens_invalid_entry_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"short": {"user": "a", "scopes": []}}))
    with pytest.raises(ConfigurationError, match="invalid entry"):
        load_tokens(path)


def test_cli_registers_gateway() -> None:
    app = typer.Typer()
    register(app)

    @app.command()
    def other() -> None:
        """Make typer keep sub-command names."""

    result = CliRunner().invoke(app, ["gateway", "--help"])
    assert result.exit_code == 0
    assert "--audit-log" in result.output
