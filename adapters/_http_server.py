"""uvicorn inside the service's own event loop, for the push endpoint and the operations endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from consumer.config import ListenAddress


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the CLI owns SIGTERM/SIGINT and decides shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


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
    """Serve ``app`` on ``sock`` in a task of this loop; return once it accepts connections."""
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
