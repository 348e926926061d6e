"""The gateway served by uvicorn in a background thread of this process."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from clinfer.errors import ConfigurationError, ServerError
from clinfer.gateway.app import GatewaySettings, create_app

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class GatewayThread:
    """A gateway listening on ``host:port`` in a daemon thread.

    Parameters
    ----------
    settings : GatewaySettings
        Settings of the gateway application.
    host : str
        Address to listen on.
    port : int
        TCP port; 0 picks a free port.
    """

    def __init__(
        self, settings: GatewaySettings, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> GatewayThread:
        """Bind the port, start serving and wait until uvicorn has started.

        Raises
        ------
        ConfigurationError
            If the settings are invalid or the address cannot be bound.
        ServerError
            If uvicorn does not start within 30 s.
        """
        app = create_app(self.settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ConfigurationError(
                f"cannot serve the gateway on {self.host}:{self.port}: {exc}; pass "
                "another port, or 0 for any free port"
            ) from exc
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and time.monotonic() < deadline:
            if not self._thread.is_alive():
                break
            time.sleep(0.05)
        if not server.started:
            self.stop()
            raise ServerError(
                f"the gateway on {self.address} did not start within "
                f"{START_TIMEOUT_S:.0f} s; see the log above"
            )
        logger.info("gateway listening on %s", self.url)
        return self

    def is_running(self) -> bool:
        """Return whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to exit and wait up to ``timeout_s`` for the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                logger.warning("gateway thread on %s did not stop", self.address)
        self._server = None
        self._thread = None
        logger.info("gateway on %s stopped", self.address)
