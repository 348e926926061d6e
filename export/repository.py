"""Write exported models into a Triton model repository.

Layout of one model::

    model_repository/<name>/
        config.pbtxt               Python backend hosting ONNX Runtime (embedded server)
        configs/onnxruntime.pbtxt  Triton's native onnxruntime backend (GPU servers)
        clinfer.json               the clinfer spec, also embedded in both configs
        <version>/model.onnx
        <version>/model.py         the Python-backend host (used by config.pbtxt only)

Triton picks ``configs/<name>.pbtxt`` instead of ``config.pbtxt`` when started with
``--model-config-name=<name>`` (Triton 23.04 and later), so one repository serves both
the embedded CPU server and NVIDIA's container on GPUs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinfer.errors import ExportError

logger = logging.getLogger(__name__)

PYTHON_HOST_SOURCE = Path(__file__).with_name("triton_onnx_model.py")
SPEC_PARAMETER = "clinfer_spec"

# Priority levels used by every clinfer model: 1 for real-time queries, 2 for batch jobs.
REALTIME_PRIORITY = 1
BATCH_PRIORITY = 2


@dataclass(frozen=True)
class TritonConfigOptions:
    """Scheduling options written into config.pbtxt."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    intra_op_threads: int = 0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def existing_versions(model_dir: Path) -> list[int]:
    """Return the numeric version folders of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
    )


def _pbtxt_string(value: str) -> str:
    # Protobuf text format accepts C-style escapes; json.dumps emits a compatible
    # double-quoted literal for ASCII text.
    return json.dumps(value, ensure_ascii=True)


def render_config(
    spec: dict[str, Any],
    *,
    backend: str,
    options: TritonConfigOptions,
) -> str:
    """Render config.pbtxt text for ``backend`` ("python" or "onnxruntime")."""
    inputs = spec["input"]
    dims = [inputs["channels"], inputs["height"], inputs["width"]]
    lines = [f'name: "{spec["name"]}"']
    if backend == "python":
        lines.append('backend: "python"')
        instance_kind = "KIND_CPU"
    elif backend == "onnxruntime":
        lines.append('backend: "onnxruntime"')
        lines.append('default_model_filename: "model.onnx"')
        instance_kind = "KIND_GPU"
    else:
        raise ExportError(f"unknown backend {backend!r}; use 'python' or 'onnxruntime'")

    lines += [
        f"max_batch_size: {options.max_batch_size}",
        "input [",
        f'  {{ name: "{inputs["name"]}" data_type: TYPE_FP32 dims: {dims} }}',
        "]",
        "output [",
        f'  {{ name: "{spec["output"]["name"]}" data_type: TYPE_FP32 '
        f"dims: [{len(spec['labels'])}] }}",
        "]",
        "version_policy: { latest { num_versions: 1 } }",
        "instance_group [",
        f"  {{ kind: {instance_kind} count: {options.instance_count} }}",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {list(options.preferred_batch_sizes)}",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "  priority_levels: 2",
        f"  default_priority_level: {BATCH_PRIORITY}",
        "}",
        "parameters {",
        f'  key: "{SPEC_PARAMETER}"',
        f"  value: {{ string_value: {_pbtxt_string(json.dumps(spec, sort_keys=True))} }}",
        "}",
    ]
    if backend == "python":
        lines += [
            "parameters {",
            '  key: "intra_op_threads"',
            f'  value: {{ string_value: "{options.intra_op_threads}" }}',
            "}",
        ]
    return "\n".join(lines) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def publish_version(
    repository: Path,
    spec: dict[str, Any],
    onnx_path: Path,
    *,
    version_info: dict[str, Any],
    options: TritonConfigOptions = TritonConfigOptions(),
) -> tuple[int, bool]:
    """Publish ``onnx_path`` as a version of ``spec["name"]`` in ``repository``.

    If the newest existing version has the same ONNX bytes (SHA-256), it is kept and no
    new version is written, so repeated exports of the same weights are idempotent.
    The version folder is assembled in a temporary folder and renamed into place, so a
    server scanning the repository never sees a half-written version.

    Returns
    -------
    (version, created)
    """
    model_dir = repository / spec["name"]
    versions = existing_versions(model_dir)
    sha256 = sha256_file(onnx_path)
    previous = _read_spec(model_dir)

    if versions and previous:
        latest = versions[-1]
        known = previous.get("versions", {}).get(str(latest), {})
        if known.get("sha256") == sha256:
            spec = {**spec, "versions": previous["versions"]}
            _write_model_configs(model_dir, spec, options)
            return latest, False

    version = (versions[-1] + 1) if versions else 1
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
    try:
        shutil.copyfile(onnx_path, staging / "model.onnx")
        shutil.copyfile(PYTHON_HOST_SOURCE, staging / "model.py")
        os.replace(staging, model_dir / str(version))
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(
            f"writing version {version} into {model_dir} failed: {exc}"
        ) from exc

    all_versions = dict(previous.get("versions", {})) if previous else {}
    all_versions[str(version)] = {**version_info, "sha256": sha256}
    spec = {**spec, "versions": all_versions}
    _write_model_configs(model_dir, spec, options)
    logger.info(
        "published %s version %d (sha256 %s)", spec["name"], version, sha256[:12]
    )
    return version, True


def _read_spec(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / "clinfer.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_model_configs(
    model_dir: Path, spec: dict[str, Any], options: TritonConfigOptions
) -> None:
    _write_text_atomic(
        model_dir / "clinfer.json", json.dumps(spec, indent=2, sort_keys=True)
    )
    _write_text_atomic(
        model_dir / "config.pbtxt",
        render_config(spec, backend="python", options=options),
    )
    _write_text_atomic(
        model_dir / "configs" / "onnxruntime.pbtxt",
        render_config(spec, backend="onnxruntime", options=options),
    )
