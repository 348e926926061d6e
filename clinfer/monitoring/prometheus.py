"""Run Debian's ``prometheus`` binary with a generated scrape configuration."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from clinfer.errors import ConfigurationError, ServerError, ServerNotReadyError
from clinfer.server import free_port

logger = logging.getLogger(__name__)

DEFAULT_PROMETHEUS_PORT = 9090
APT_INSTALL = "apt-get update && apt-get install -y --no-install-recommends prometheus"
# Folder below the working folder where extra targets are read from, as Prometheus
# file_sd JSON files (``[{"targets": ["HOST:PORT"], "labels": {"job": "NAME"}}]``).
FILE_SD_DIR = "targets"


def find_prometheus() -> Path:
    """Return the path of the ``prometheus`` binary.

    Raises
    ------
    ConfigurationError
        If no ``prometheus`` binary is on ``PATH`` or in ``/usr/bin``.
    """
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if found is None:
        raise ConfigurationError(
            "the prometheus binary was not found on PATH or in /usr/bin; install "
            f"Debian's package with `{APT_INSTALL}` (or run `make venv`)."
        )
    return Path(found)


@dataclass(frozen=True)
class ScrapeTarget:
    """One Prometheus scrape job: a job name and the ``HOST:PORT`` addresses."""

    job: str
    addresses: tuple[str, ...]
    metrics_path: str = "/metrics"

    @classmethod
    def parse(cls, text: str) -> ScrapeTarget:
        """Parse ``JOB=HOST:PORT[,HOST:PORT...]`` as given to ``--target``.

        Raises
        ------
        ConfigurationError
            If the text has no ``=`` or an address has no numeric port.
        """
        job, sep, addresses = text.partition("=")
        if not sep or not job:
            raise ConfigurationError(
                f"invalid scrape target {text!r}; write JOB=HOST:PORT, for example "
                "gateway=127.0.0.1:9402."
            )
        parsed = tuple(a.strip() for a in addresses.split(",") if a.strip())
        for address in parsed:
            _, _, port = address.rpartition(":")
            if not port.isdigit():
                raise ConfigurationError(
                    f"invalid address {address!r} in scrape target {text!r}; write "
                    "HOST:PORT."
                )
        if not parsed:
            raise ConfigurationError(
                f"scrape target {text!r} has no address; write JOB=HOST:PORT."
            )
        return cls(job, parsed)


def render_config(
    targets: Sequence[ScrapeTarget],
    *,
    scrape_interval_s: float = 5.0,
    file_sd_dir: Path | None = None,
) -> str:
    """Render a Prometheus configuration (YAML) scraping ``targets``.

    With ``file_sd_dir``, Prometheus also scrapes the targets listed in the
    ``*.json`` files of that folder and rereads them when they change.
    """
    interval = f"{max(int(scrape_interval_s * 1000), 100)}ms"
    jobs: list[dict[str, Any]] = [
        {
            "job_name": target.job,
            "metrics_path": target.metrics_path,
            "static_configs": [{"targets": list(target.addresses)}],
        }
        for target in targets
    ]
    if file_sd_dir is not None:
        jobs.append(
            {
                "job_name": "file_sd",
                "file_sd_configs": [
                    {"files": [str(file_sd_dir / "*.json")], "refresh_interval": "5s"}
                ],
            }
        )
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": jobs,
    }
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class PrometheusServer:
    """A ``prometheus`` child process on loopback with its own storage folder.

    Port 0 is replaced by a free port at start.
    """

    workdir: Path
    targets: Sequence[ScrapeTarget]
    host: str = "127.0.0.1"
    port: int = DEFAULT_PROMETHEUS_PORT
    scrape_interval_s: float = 5.0
    retention: str = "1d"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_handle: Any = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_file(self) -> Path:
        return Path(self.workdir) / "prometheus.yml"

    @property
    def log_file(self) -> Path:
        return Path(self.workdir) / "prometheus.log"

    def start(self, *, timeout_s: float = 60.0) -> PrometheusServer:
        """Write the configuration, start prometheus and wait until it is ready.

        Raises
        ------
        ConfigurationError
            If the prometheus binary is missing.
        ServerError
            If it is already running or exits during start-up.
        ServerNotReadyError
            If it is not ready within ``timeout_s``.
        """
        if self.process is not None:
            raise ServerError("prometheus is already running")
        binary = find_prometheus()
        # prometheus runs inside workdir, so the paths it gets must be absolute.
        self.workdir = workdir = Path(self.workdir).resolve()
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        (workdir / FILE_SD_DIR).mkdir(exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        self.config_file.write_text(
            render_config(
                self.targets,
                scrape_interval_s=self.scrape_interval_s,
                file_sd_dir=workdir / FILE_SD_DIR,
            )
        )
        command = [
            str(binary),
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--storage.tsdb.retention.time={self.retention}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
        ]
        self._log_handle = open(self.log_file, "ab")
        logger.info("starting prometheus on %s, log %s", self.url, self.log_file)
        self.process = subprocess.Popen(
            command,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(
                    f"prometheus exited with code {self.process.returncode} during "
                    f"start-up; last log lines:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2.0) as r:
                    if r.status == 200:
                        logger.info("prometheus is ready on %s", self.url)
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the TSDB loads
            time.sleep(0.25)
        raise ServerNotReadyError(
            f"prometheus was not ready on {self.url} after {timeout_s:.0f} s; last "
            f"log lines:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(
            self.log_file.read_text(errors="replace").splitlines()[-lines:]
        )

    def api(self, path: str, **params: str) -> Any:
        """Call ``/api/v1/PATH`` and return its ``data`` field.

        Raises
        ------
        ServerError
            If the request fails or Prometheus returns an error status.
        """
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10.0) as response:
                body = json.load(response)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ServerError(f"Prometheus API request {url} failed: {exc}") from exc
        if body.get("status") != "success":
            raise ServerError(f"Prometheus API request {url} returned {body}")
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """Evaluate an instant PromQL query and return its vector result."""
        return list(self.api("query", query=expression)["result"])

    def stop(self, *, timeout_s: float = 30.0) -> None:
        """Stop prometheus with SIGTERM, then SIGKILL after ``timeout_s``."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "prometheus did not stop in %.0f s; killing it", timeout_s
                )
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            logger.info("prometheus stopped (exit code %s)", process.returncode)
        self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def __enter__(self) -> PrometheusServer:
        return self.start() if self.process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
