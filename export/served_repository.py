"""Triton configs and versioned publishing for the trained multi-input models.

Layout of one model::

    <repository>/<name>/
        config.pbtxt               Python backend (embedded CPU server)
        configs/onnxruntime.pbtxt  Triton's native onnxruntime backend (GPU servers)
        configs/tensorrt.pbtxt     Triton's tensorrt backend, needs <version>/model.plan
        clinfer.json               the spec: inputs, outputs, labels, versions, parity
        labels.txt                 class labels, one a line (label_filename)
        <version>/...              model.onnx and Python host files, or model.py

``publish_realtime_copy`` mirrors a model into ``<name>_realtime``: the same version
folders (hard links where possible) and SHA-256, with configs for one instance, no
batching delay and priority 1 as the default level. A real-time request sent there
does not queue behind batch executions of the batch model's instances, though both
models share the CPU cores.

``tritonserver --model-config-name=onnxruntime`` (Triton 23.04 and later) reads
``configs/onnxruntime.pbtxt`` instead of ``config.pbtxt`` where a model has it and
``config.pbtxt`` elsewhere, so a composition with only ``config.pbtxt`` is served by
the Python backend under every config name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clinfer.export.repository import (
    BATCH_PRIORITY,
    REALTIME_PRIORITY,
    REALTIME_SUFFIX,
    SPEC_PARAMETER,
    existing_versions,
    pbtxt_string,
    write_text_atomic,
)

from clinfer.errors import ExportError

logger = logging.getLogger(__name__)

BACKENDS = ("python", "onnxruntime", "tensorrt")
LABELS_FILE = "labels.txt"
SPEC_FILE = "clinfer.json"
PRIORITY_LEVELS = 2


@dataclass(frozen=True)
class ServingOptions:
    """Scheduling options written into every config."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32)
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    intra_op_threads: int = 0
    warmup: bool = True
    realtime_models: bool = True
    """Whether to publish ``<name>_realtime`` copies of the composition and of the
    models it calls, and name them in the batch configs for real-time clients."""
    default_priority_level: int = BATCH_PRIORITY
    """Priority level of requests that set none: 2 (batch) or 1 (real-time)."""


def realtime_serving_options(options: ServingOptions) -> ServingOptions:
    """Return the options of a real-time copy: one instance, no delay, priority 1.

    The maximum batch size stays that of the batch model, so every request the
    batch model accepts is accepted by its copy too.
    """
    return replace(
        options,
        instance_count=1,
        max_queue_delay_us=0,
        default_priority_level=REALTIME_PRIORITY,
        realtime_models=False,
    )


def _tensor_lines(tensors: list[dict[str, Any]], *, outputs: bool) -> list[str]:
    lines = []
    for tensor in tensors:
        label = f' label_filename: "{LABELS_FILE}"' if tensor.get("labels") else ""
        lines.append(
            f'  {{ name: "{tensor["name"]}" data_type: TYPE_FP32 '
            f"dims: {list(tensor['dims'])}{label if outputs else ''} }}"
        )
    return [",\n".join(lines)]


def _warmup_lines(inputs: list[dict[str, Any]]) -> list[str]:
    lines = ["model_warmup [", "  {", '    name: "zeros"', "    batch_size: 1"]
    for tensor in inputs:
        lines += [
            "    inputs {",
            f'      key: "{tensor["name"]}"',
            f"      value {{ data_type: TYPE_FP32 dims: {list(tensor['dims'])} "
            "zero_data: true }",
            "    }",
        ]
    return [*lines, "  }", "]"]


def render_config(
    spec: Mapping[str, Any],
    *,
    backend: str,
    options: ServingOptions | None = None,
    warmup: bool | None = None,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """Render Triton config text for ``backend`` (python, onnxruntime or tensorrt).

    The header comments list each output with its meaning and the labels, and the
    ``clinfer_spec`` parameter contains the whole spec as JSON. ``parameters`` are
    written as further config parameters under every backend.

    Raises
    ------
    ExportError
        If ``backend`` is not one of ``BACKENDS``.
    """
    if backend not in BACKENDS:
        raise ExportError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    options = options or ServingOptions()
    lines = [f"# {spec['name']}: {spec['task']}"]
    lines += [f"# labels: {', '.join(spec['labels'])}"]
    for tensor in [*spec["inputs"], *spec["outputs"]]:
        lines.append(f"# {tensor['name']}: {tensor['description']}")
    lines.append(f'name: "{spec["name"]}"')
    if backend == "python":
        lines.append('backend: "python"')
        kind = "KIND_CPU"
    elif backend == "onnxruntime":
        lines += ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
        kind = "KIND_GPU"
    else:
        lines += [
            "# <version>/model.plan is written only by `clinfer export-trained` on a",
            "# machine with TensorRT and a GPU; clinfer.json records whether it was.",
            'backend: "tensorrt"',
            'default_model_filename: "model.plan"',
        ]
        kind = "KIND_GPU"
    lines += [
        f"max_batch_size: {options.max_batch_size}",
        "input [",
        *_tensor_lines(spec["inputs"], outputs=False),
        "]",
        "output [",
        *_tensor_lines(spec["outputs"], outputs=True),
        "]",
        "version_policy: { latest { num_versions: 1 } }",
        f"instance_group [ {{ kind: {kind} count: {options.instance_count} }} ]",
        "dynamic_batching {",
        f"  preferred_batch_size: {list(options.preferred_batch_sizes)}",
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        f"  priority_levels: {PRIORITY_LEVELS}",
        f"  default_priority_level: {options.default_priority_level}",
        "}",
    ]
    if options.warmup if warmup is None else warmup:
        lines += _warmup_lines(spec["inputs"])
    all_parameters = {SPEC_PARAMETER: json.dumps(dict(spec), sort_keys=True)}
    all_parameters.update(parameters or {})
    if backend == "python":
        all_parameters["intra_op_threads"] = str(options.intra_op_threads)
        all_parameters.update(spec.get("python_parameters", {}))
    for key, value in all_parameters.items():
        lines += [
            "parameters {",
            f'  key: "{key}"',
            f"  value: {{ string_value: {pbtxt_string(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def content_sha256(files: Mapping[str, bytes]) -> str:
    """Return the SHA-256 of a version's files: sorted names and contents."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()


def read_spec(model_dir: Path) -> dict[str, Any] | None:
    """Return the ``clinfer.json`` of a model folder, or None if there is none."""
    path = model_dir / SPEC_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def publish_model(
    repository: Path,
    spec: Mapping[str, Any],
    files: Mapping[str, bytes],
    *,
    version_info: Mapping[str, Any],
    backends: tuple[str, ...] = BACKENDS,
    options: ServingOptions | None = None,
    warmup: bool | None = None,
    parameters: Mapping[str, str] | None = None,
) -> tuple[int, bool]:
    """Publish ``files`` as a version of ``spec["name"]`` and rewrite its configs.

    If the newest version has the same files (``content_sha256``), it is kept and
    no version is added, so re-exporting unchanged weights is idempotent. A new
    version is assembled in a staging folder and renamed into place, so a server
    polling the repository never loads a half-written version. ``config.pbtxt`` uses
    the first backend and ``configs/<backend>.pbtxt`` the others. ``parameters``
    are added to every config (see ``render_config``).

    Returns
    -------
    (version, created)

    Raises
    ------
    ExportError
        If the version folder cannot be written.
    """
    options = options or ServingOptions()
    model_dir = Path(repository) / spec["name"]
    versions = existing_versions(model_dir)
    sha256 = content_sha256(files)
    previous = read_spec(model_dir) or {}
    known = previous.get("versions", {})
    if versions and known.get(str(versions[-1]), {}).get("sha256") == sha256:
        version, created = versions[-1], False
    else:
        version, created = (versions[-1] + 1) if versions else 1, True
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=".staging-"))
        try:
            for name, content in files.items():
                (staging / name).write_bytes(content)
            os.replace(staging, model_dir / str(version))
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ExportError(
                f"writing version {version} into {model_dir} failed: {exc}; check "
                "the repository's permissions and free space"
            ) from exc
        known = {**known, str(version): {**version_info, "sha256": sha256}}
    full_spec = {**spec, "versions": known}
    write_text_atomic(
        model_dir / SPEC_FILE, json.dumps(full_spec, indent=2, sort_keys=True)
    )
    _write_configs(model_dir, full_spec, backends, options, warmup, parameters)
    if created:
        logger.info(
            "Published %s version %d (sha256 %s)", spec["name"], version, sha256[:12]
        )
    return version, created


def _write_configs(
    model_dir: Path,
    spec: Mapping[str, Any],
    backends: tuple[str, ...],
    options: ServingOptions,
    warmup: bool | None,
    parameters: Mapping[str, str] | None,
) -> None:
    write_text_atomic(model_dir / LABELS_FILE, "\n".join(spec["labels"]) + "\n")
    for index, backend in enumerate(backends):
        target = "config.pbtxt" if index == 0 else f"configs/{backend}.pbtxt"
        text = render_config(
            spec,
            backend=backend,
            options=options,
            warmup=warmup,
            parameters=parameters,
        )
        write_text_atomic(model_dir / target, text)


def realtime_name(name: str) -> str:
    """Return the name of the real-time copy of model ``name``."""
    return name + REALTIME_SUFFIX


def publish_realtime_copy(
    repository: Path,
    name: str,
    *,
    backends: tuple[str, ...] = BACKENDS,
    options: ServingOptions | None = None,
    warmup: bool | None = None,
    parameters: Mapping[str, str] | None = None,
) -> list[int]:
    """Mirror the published model ``name`` into ``<name>_realtime``.

    Every version folder of ``name`` is copied under the same number, through hard
    links where the file system allows them, and versions that ``name`` no longer
    has are removed. A version whose recorded SHA-256 differs from the batch
    model's is replaced. The copy's ``clinfer.json`` is the batch spec under the new
    name, so both record the same versions and SHA-256. Its configs use
    ``realtime_serving_options(options)``. Call it after every ``publish_model`` of
    ``name``, so the copy's versions follow the batch model's.

    Returns
    -------
    list of int
        The versions of the copy, ascending.

    Raises
    ------
    ExportError
        If ``name`` has no published spec or the copy cannot be written.
    """
    repository = Path(repository)
    source_dir = repository / name
    spec = read_spec(source_dir)
    if spec is None:
        raise ExportError(
            f"{source_dir} has no {SPEC_FILE}; publish {name} before its real-time copy"
        )
    target_name = realtime_name(name)
    target_dir = repository / target_name
    versions = existing_versions(source_dir)
    mirrored = (read_spec(target_dir) or {}).get("versions", {})
    known = spec.get("versions", {})
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        for stale in set(existing_versions(target_dir)) - set(versions):
            shutil.rmtree(target_dir / str(stale))
        for version in versions:
            target = target_dir / str(version)
            sha256 = known.get(str(version), {}).get("sha256")
            same = mirrored.get(str(version), {}).get("sha256") == sha256
            if target.is_dir() and sha256 is not None and same:
                continue
            _mirror_version(source_dir / str(version), target)
    except OSError as exc:
        raise ExportError(
            f"writing the real-time copy {target_dir} of {name} failed: {exc}; check "
            "the repository's permissions and free space"
        ) from exc
    copy_spec = {**spec, "name": target_name}
    write_text_atomic(
        target_dir / SPEC_FILE, json.dumps(copy_spec, indent=2, sort_keys=True)
    )
    _write_configs(
        target_dir,
        copy_spec,
        backends,
        realtime_serving_options(options or ServingOptions()),
        warmup,
        parameters,
    )
    return versions


def remove_realtime_copy(repository: Path, name: str) -> bool:
    """Delete ``<name>_realtime`` if clinfer published it as a copy of ``name``.

    Returns
    -------
    bool
        Whether a copy was deleted.

    Raises
    ------
    ExportError
        If the folder cannot be deleted.
    """
    target_dir = Path(repository) / realtime_name(name)
    spec = read_spec(target_dir)
    if spec is None or spec.get("name") != realtime_name(name):
        return False
    try:
        shutil.rmtree(target_dir)
    except OSError as exc:
        raise ExportError(
            f"deleting the real-time copy {target_dir} failed: {exc}; delete it by "
            "hand or publish with real-time copies on"
        ) from exc
    logger.info("Deleted the real-time copy %s", target_dir.name)
    return True


def _mirror_version(source: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        # The Python backend compiles model.py into __pycache__ beside it once a
        # server has loaded the model; the copy takes the published files only.
        shutil.copytree(
            source,
            staging,
            copy_function=_link_or_copy,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
    return destination
