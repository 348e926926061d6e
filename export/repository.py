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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clinfer.errors import ExportError

logger = logging.getLogger(__name__)

PYTHON_HOST_SOURCE = Path(__file__).with_name("triton_onnx_model.py")
SPEC_PARAMETER = "clinfer_spec"

# Priority levels used by every clinfer model: 1 for real-time queries, 2 for batch jobs.
REALTIME_PRIORITY = 1
BATCH_PRIORITY = 2
# Suffix of the dedicated real-time model and the batch config parameter naming it.
REALTIME_SUFFIX = "_realtime"
REALTIME_MODEL_PARAMETER = "clinfer_realtime_model"
# Extra output of the Python-backend config: ONNX Runtime milliseconds per execution.
COMPUTE_OUTPUT = "compute_ms"


@dataclass(frozen=True)
class TritonConfigOptions:
    """Scheduling options written into config.pbtxt."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    intra_op_threads: int = 0
    # Queue policy of the batch level. 0 means no limit and no timeout; a timed-out
    # batch request is delayed behind the others, not rejected.
    batch_max_queue_size: int = 0
    batch_timeout_us: int = 0
    # Two defaults shorten real-time latency under a batch load. A dedicated
    # "<name>_realtime" model on the same ONNX versions means a real-time request
    # never waits for a running batch execution. Without ONNX Runtime thread
    # spinning, idle threads of one instance do not busy-wait on the other's cores.
    # `clinfer bench realtime` measures both against the alternatives.
    realtime_model: bool = True
    realtime_intra_op_threads: int = 0
    allow_spinning: bool = False
    """Whether idle ONNX Runtime threads busy-wait for work (python only)."""
    process_nice: int = 0
    """Added to the nice value of the batch model's stub processes (python only)."""


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


def pbtxt_string(value: str) -> str:
    """Quote ``value`` as a protobuf text-format string literal."""
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
        *_timing_output_lines(backend),
        "version_policy: { latest { num_versions: 1 } }",
        "instance_group [",
        f"  {{ kind: {instance_kind} count: {options.instance_count} }}",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: {list(options.preferred_batch_sizes)}",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "  priority_levels: 2",
        f"  default_priority_level: {BATCH_PRIORITY}",
        *_queue_policy_lines(options),
        "}",
        "parameters {",
        f'  key: "{SPEC_PARAMETER}"',
        f"  value: {{ string_value: {pbtxt_string(json.dumps(spec, sort_keys=True))} }}",
        "}",
    ]
    if options.realtime_model:
        lines += [
            "parameters {",
            f'  key: "{REALTIME_MODEL_PARAMETER}"',
            f'  value: {{ string_value: "{spec["name"]}{REALTIME_SUFFIX}" }}',
            "}",
        ]
    if backend == "python":
        lines += [
            "parameters {",
            '  key: "intra_op_threads"',
            f'  value: {{ string_value: "{options.intra_op_threads}" }}',
            "}",
            "parameters {",
            '  key: "allow_spinning"',
            f'  value: {{ string_value: "{int(options.allow_spinning)}" }}',
            "}",
            "parameters {",
            '  key: "process_nice"',
            f'  value: {{ string_value: "{options.process_nice}" }}',
            "}",
        ]
    return "\n".join(lines) + "\n"


def _timing_output_lines(backend: str) -> list[str]:
    # The Python-backend host fills this output with its ONNX Runtime time per
    # execution; the native onnxruntime backend has no such output.
    if backend != "python":
        return []
    return [
        "output [",
        f'  {{ name: "{COMPUTE_OUTPUT}" data_type: TYPE_FP32 dims: [1] }}',
        "]",
    ]


def _queue_policy_lines(options: TritonConfigOptions) -> list[str]:
    # Real-time requests are never timed out or rejected for queue size; batch
    # requests may be bounded, and a timed-out one is delayed, not failed.
    return [
        "  priority_queue_policy {",
        f"    key: {REALTIME_PRIORITY}",
        "    value: { timeout_action: REJECT default_timeout_microseconds: 0 "
        "allow_timeout_override: false max_queue_size: 0 }",
        "  }",
        "  priority_queue_policy {",
        f"    key: {BATCH_PRIORITY}",
        "    value: { timeout_action: DELAY "
        f"default_timeout_microseconds: {options.batch_timeout_us} "
        "allow_timeout_override: true "
        f"max_queue_size: {options.batch_max_queue_size} }}",
        "  }",
    ]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
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
    write_text_atomic(
        model_dir / "clinfer.json", json.dumps(spec, indent=2, sort_keys=True)
    )
    write_text_atomic(
        model_dir / "config.pbtxt",
        render_config(spec, backend="python", options=options),
    )
    write_text_atomic(
        model_dir / "configs" / "onnxruntime.pbtxt",
        render_config(spec, backend="onnxruntime", options=options),
    )
    if options.realtime_model:
        write_realtime_model(model_dir, spec, options)


def realtime_options(options: TritonConfigOptions) -> TritonConfigOptions:
    """Return the config options of the dedicated real-time model.

    It has one instance at the default nice value, ``realtime_intra_op_threads``
    ONNX Runtime threads, the same batching and no real-time model of its own.
    """
    return replace(
        options,
        instance_count=1,
        intra_op_threads=options.realtime_intra_op_threads,
        process_nice=0,
        realtime_model=False,
    )


def write_realtime_model(
    model_dir: Path, spec: dict[str, Any], options: TritonConfigOptions
) -> None:
    """Mirror every version of ``model_dir`` into ``<name>_realtime`` with its configs.

    Version folders are hard-linked where the file system allows it, else copied,
    so both models serve the same bytes and the same SHA-256.
    """
    name = spec["name"] + REALTIME_SUFFIX
    target_dir = model_dir.parent / name
    versions = existing_versions(model_dir)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        for stale in set(existing_versions(target_dir)) - set(versions):
            shutil.rmtree(target_dir / str(stale))
        for version in versions:
            target = target_dir / str(version)
            if target.is_dir():
                continue
            staging = Path(tempfile.mkdtemp(dir=target_dir, prefix=".staging-"))
            shutil.copytree(
                model_dir / str(version),
                staging,
                copy_function=_link_or_copy,
                dirs_exist_ok=True,
            )
            os.replace(staging, target)
    except OSError as exc:
        raise ExportError(
            f"writing the real-time model {name} into {target_dir} failed: {exc}"
        ) from exc
    realtime_spec = {**spec, "name": name}
    rt_options = realtime_options(options)
    write_text_atomic(
        target_dir / "clinfer.json", json.dumps(realtime_spec, indent=2, sort_keys=True)
    )
    write_text_atomic(
        target_dir / "config.pbtxt",
        render_config(realtime_spec, backend="python", options=rt_options),
    )
    write_text_atomic(
        target_dir / "configs" / "onnxruntime.pbtxt",
        render_config(realtime_spec, backend="onnxruntime", options=rt_options),
    )


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
    return destination
