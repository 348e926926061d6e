"""Save and load trained models: ``model.pt`` weights plus ``metadata.json``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sklearn
import torch
from torch import nn

from clinfer import __version__
from clinfer.errors import ConfigurationError
from clinfer.train.models import CxrCnn, FusionHead, FusionModel, TabularMlp

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.pt"
METADATA_NAME = "metadata.json"
METADATA_SCHEMA = 1


@dataclass(frozen=True)
class TrainedModel:
    """A trained model as saved: its folder and metadata, including metrics."""

    name: str
    directory: Path
    metadata: dict[str, Any]

    @property
    def test_metrics(self) -> dict[str, Any]:
        """Metrics on the held-out test split."""
        return self.metadata["metrics"]["test"]


def code_version() -> dict[str, Any]:
    """Return clinfer's version, the git commit of its source and library versions.

    ``git_commit`` and ``git_dirty`` (tracked files changed since the commit) are
    None outside a git checkout or without git. Git runs with optional locks off, so
    it never writes the index of the checkout.
    """
    source = Path(__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    commit: str | None = None
    dirty: bool | None = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=source,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        dirty = bool(changed.strip())
    except (OSError, subprocess.SubprocessError):
        logger.debug("No git commit found for %s", source)
    return {
        "clinfer": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "scikit_learn": sklearn.__version__,
    }


def save_model(
    model: nn.Module, name: str, out_dir: Path, metadata: dict[str, Any]
) -> TrainedModel:
    """Write ``out_dir/name/model.pt`` (state dict) and ``metadata.json``.

    The metadata gets ``weights_file`` and ``weights_sha256`` added.

    Returns
    -------
    TrainedModel
        The saved model's folder and final metadata.

    Raises
    ------
    OSError
        If the folder or a file cannot be written.
    """
    directory = Path(out_dir) / name
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    torch.save(model.state_dict(), weights)
    metadata = {
        **metadata,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (directory / METADATA_NAME).write_text(
        json.dumps(metadata, indent=1), encoding="utf-8"
    )
    test = metadata["metrics"]["test"]
    auroc = "n/a" if test["auroc"] is None else f"{test['auroc']:.3f}"
    logger.info(
        "Saved %s to %s: test AUROC %s, accuracy %.3f (n=%d)",
        name,
        directory,
        auroc,
        test["accuracy"],
        test["n"],
    )
    return TrainedModel(name, directory, metadata)


def _build(metadata: dict[str, Any]) -> nn.Module:
    """Build an untrained model with the architecture recorded in ``metadata``."""
    architecture = metadata["architecture"]
    kind = architecture["class"]
    if kind == "CxrCnn":
        return CxrCnn(widths=architecture["widths"])
    features = len(metadata["feature_names"])
    if kind == "TabularMlp":
        return TabularMlp(
            torch.zeros(features), torch.ones(features), hidden=architecture["hidden"]
        )
    if kind == "FusionModel":
        encoder = CxrCnn(widths=architecture["image_encoder"]["widths"])
        embedding = encoder.embedding_size
        head = FusionHead(
            torch.zeros(embedding),
            torch.ones(embedding),
            torch.zeros(features),
            torch.ones(features),
            hidden=architecture["head"]["hidden"],
        )
        return FusionModel(encoder, head)
    raise ConfigurationError(f"unknown model class {kind!r} in the metadata")


def load_trained_model(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model saved by ``save_model``, in eval mode, with its metadata.

    Raises
    ------
    ConfigurationError
        If ``metadata.json`` or ``model.pt`` is missing, the metadata has another
        schema or an unknown model class, or the weights do not match
        ``weights_sha256``.
    """
    directory = Path(directory)
    metadata_path = directory / METADATA_NAME
    weights_path = directory / WEIGHTS_NAME
    for path in (metadata_path, weights_path):
        if not path.is_file():
            raise ConfigurationError(
                f"{path} not found; train the model with `clinfer train` first"
            )
    metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    if metadata.get("schema") != METADATA_SCHEMA:
        raise ConfigurationError(
            f"{metadata_path} has schema {metadata.get('schema')!r}, expected "
            f"{METADATA_SCHEMA}; retrain the model with this clinfer version"
        )
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if digest != metadata.get("weights_sha256"):
        raise ConfigurationError(
            f"{weights_path} has sha256 {digest}, but {metadata_path} records "
            f"{metadata.get('weights_sha256')}; the files are from different runs"
        )
    model = _build(metadata)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    model.eval()
    return model, metadata
