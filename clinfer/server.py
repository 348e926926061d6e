"""Embedded Triton Inference Server: the ``tritonserver`` binary of nvidia-pytriton.

The nvidia-pytriton wheel ships ``tritonserver`` 2.51.0 with the Python backend and
one ``triton_python_backend_stub`` per Python version. This module lays out a backend
folder with the stub for the running Python, starts the server on loopback ports with
this environment's ``bin`` first on ``PATH`` (the stub imports numpy and onnxruntime
from the first ``python`` it finds) and waits until the server and its models are ready.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import tritonclient.http as triton_http

from clinfer.errors import ConfigurationError, ServerError, ServerNotReadyError

logger = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ConfigurationError(
            "nvidia-pytriton is not installed, so no tritonserver binary is available; "
            "install clinfer's dependencies with `make venv`."
        ) from exc
    return Path(pytriton.__file__).resolve().parent


def tritonserver_paths() -> tuple[Path, Path, Path]:
    """Return (tritonserver binary, library folder, Python backend folder)."""
    root = _pytriton_root()
    binary = root / "tritonserver" / "bin" / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    backend = root / "tritonserver" / "backends" / "python"
    for path in (binary, libs, backend):
        if not path.exists():
            raise ConfigurationError(
                f"{path} is missing from the nvidia-pytriton installation; reinstall "
                "nvidia-pytriton==0.5.14."
            )
    return binary, libs, backend


def prepare_backend_dir(target: Path) -> Path:
    """Lay out ``target/python`` with the Python backend and the stub for this Python.

    Returns the backend folder to pass as ``--backend-directory``.
    """
    root = _pytriton_root()
    _, _, backend = tritonserver_paths()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / python_version
    stub = stub / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigurationError(
            f"nvidia-pytriton has no Python backend stub for Python {python_version}; "
            "use Python 3.10, 3.11 or 3.12."
        )
    python_dir = target / "python"
    if not (python_dir / "triton_python_backend_stub").is_file():
        tmp = target / f".python-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(backend, tmp, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "triton_python_backend_stub")
        target.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, python_dir)
        except OSError:
            # Another process laid out the same folder first.
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _stop_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child when its parent dies.

    The server runs in its own session, so that a terminal's Ctrl-C reaches clinfer
    first and clinfer stops the server cleanly. Without this, a killed clinfer
    would leave the server running.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def default_backend_dir() -> Path:
    """Return the per-user cache folder of the laid-out Python backend.

    The folder name carries the nvidia-pytriton and Python versions, so an upgrade
    of either lays out a fresh copy instead of reusing a stale stub.
    """
    from importlib.metadata import version

    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    name = f"pytriton-{version('nvidia-pytriton')}-py{python_version}"
    return Path.home() / ".cache" / "clinfer" / "triton-backends" / name


@dataclass
class EmbeddedTritonServer:
    """A ``tritonserver`` child process serving a model repository on loopback.

    Use as a context manager or call :meth:`start` and :meth:`stop`. Ports of 0 are
    replaced by free ports at start.
    """

    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    log_file: Path | None = None
    backend_dir: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_handle: object = field(default=None, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self, *, timeout_s: float = 120.0) -> EmbeddedTritonServer:
        """Start the server and wait until it and every model are ready.

        Raises
        ------
        ServerError
            If the process exits during start-up (the message quotes its log).
        ServerNotReadyError
            If it is not ready within ``timeout_s``.
        """
        if self.process is not None:
            raise ServerError("the embedded Triton server is already running")
        repository = Path(self.model_repository).resolve()
        if not repository.is_dir():
            raise ConfigurationError(
                f"model repository {repository} does not exist; run `clinfer export` first."
            )
        binary, libs, _ = tritonserver_paths()
        backend_dir = self.backend_dir or default_backend_dir()
        backend_dir = prepare_backend_dir(Path(backend_dir))

        for name in ("http_port", "grpc_port", "metrics_port"):
            if getattr(self, name) == 0:
                setattr(self, name, free_port(self.host))

        log_file = Path(self.log_file or (Path.cwd() / "tritonserver.log"))
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = log_file
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
        command = [
            str(binary),
            f"--model-repository={repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]
        self._log_handle = open(log_file, "ab")
        logger.info(
            "starting tritonserver (grpc %s, http %s, metrics %d), log %s",
            self.grpc_url,
            self.http_url,
            self.metrics_port,
            log_file,
        )
        self.process = subprocess.Popen(
            command,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        client = triton_http.InferenceServerClient(
            self.http_url, connection_timeout=2.0
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise ServerError(
                        f"tritonserver exited with code {self.process.returncode} during "
                        f"start-up; last log lines:\n{self.log_tail()}"
                    )
                try:
                    if client.is_server_ready():
                        logger.info("tritonserver is ready on grpc %s", self.grpc_url)
                        return
                except Exception:  # connection refused while the server starts
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise ServerNotReadyError(
            f"tritonserver was not ready after {timeout_s:.0f} s; last log lines:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return "(no log)"
        text = Path(self.log_file).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop the server with SIGTERM, then SIGKILL after ``timeout_s``."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "tritonserver did not stop in %.0f s; killing it", timeout_s
                )
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            logger.info("tritonserver stopped (exit code %s)", process.returncode)
        self.process = None
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
            self._log_handle = None

    def __enter__(self) -> EmbeddedTritonServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
