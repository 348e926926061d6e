"""Session fixtures: an exported model, a real embedded Triton server and local Ray."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from clinfer.export.cxr import ExportResult, export_cxr_model
from clinfer.workers.pipeline import LOOPBACK_RAY_ENV

from clinfer.server import EmbeddedTritonServer

# Keep every Ray service of the tests, and of the commands they start, on loopback
# (see clinfer.workers.pipeline._init_ray).
os.environ[LOOPBACK_RAY_ENV] = "0"

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    repository = tmp_path_factory.mktemp("model_repository")
    return export_cxr_model(repository)


@pytest.fixture(scope="session")
def model_repository(exported_model: ExportResult) -> Path:
    return exported_model.repository


def _start_server(repository: Path, log_dir: Path) -> EmbeddedTritonServer:
    server = EmbeddedTritonServer(
        repository,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=log_dir / "tritonserver.log",
    )
    return server.start()


@pytest.fixture(scope="session")
def triton_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedTritonServer]:
    server = _start_server(model_repository, tmp_path_factory.mktemp("triton"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def second_triton_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedTritonServer]:
    server = _start_server(model_repository, tmp_path_factory.mktemp("triton2"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
