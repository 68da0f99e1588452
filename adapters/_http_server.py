"""uvicorn inside the service's own event loop, for the push endpoint and the operations endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any, Final, NamedTuple

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class ListenAddress(NamedTuple):
    """A ``host:port`` to listen on; port 0 asks the OS for a free port (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# Request line and headers larger than this are refused (400) before they are buffered further.
MAX_HEADER_BYTES: Final = 16 * 1024


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the CLI owns SIGTERM/SIGINT and decides shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two bounds it lacks: a deadline for a request's line and headers,
    and a cap on open connections.

    Without them, connections that never finish their headers are held forever, until the process runs
    out of file descriptors and nothing, the operations endpoints included, accepts any more. The deadline
    starts with the connection and again with the first byte of each following request (uvicorn's own
    keep-alive timeout covers the idle time in between); a connection over the cap is closed as soon as it
    is accepted.
    """

    header_timeout: float = 10.0
    max_connections: int | None = None
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.close()
            return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_deadline is not None and self.conn.their_state is not h11.IDLE:
            self._cancel_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout: float, max_connections: int | None) -> type[H11Protocol]:
    """Return uvicorn's h11 protocol bounded by ``header_timeout`` seconds to send a request's headers and
    ``max_connections`` open connections (None: no cap)."""
    return type(
        "GuardedH11Protocol",
        (_GuardedH11Protocol,),
        {"header_timeout": header_timeout, "max_connections": max_connections},
    )


def listen_socket(listen: ListenAddress, variable: str) -> socket.socket:
    """Bind ``listen`` now, so a taken port is an OSError naming ``variable`` at start (uvicorn's own
    binding would exit the process instead)."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        return socket.create_server((listen.host, listen.port), family=family, backlog=1024)
    except OSError as exc:
        raise OSError(f"{variable}: cannot listen on {listen}: {exc.strerror}") from None


async def serve(
    app: Any, sock: socket.socket, name: str, **options: Any
) -> tuple[EmbeddedServer, asyncio.Task[None]]:
    """Serve ``app`` on ``sock`` in a task of this loop; return once it accepts connections.

    Every server gets a header deadline (10 s unless ``http`` says otherwise) and a header size limit.
    """
    options.setdefault("http", guarded_protocol(10.0, None))
    options.setdefault("h11_max_incomplete_event_size", MAX_HEADER_BYTES)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", server_header=False, **options
    )
    server = EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=name)
    async with asyncio.timeout(10):
        while not server.started:
            if task.done():
                task.result()
                raise ConnectionError(f"{name}: the server stopped while starting")
            await asyncio.sleep(0.01)
    return server, task
