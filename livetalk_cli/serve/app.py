"""`livetalk serve-local`: the ASGI app (FastAPI on uvicorn) and how it is run.

    GET  /             the browser page (static/index.html)
    GET  /v1/health    protocol version, model, sessions in use / allowed
    WS   /v1/ws        the session API (serve/protocol.py), one session per connection

Security: the server binds 127.0.0.1 unless told otherwise, and any other host needs a token
(`?token=` or `Authorization: Bearer`, compared in constant time on every connection). A browser's
WebSocket must come from the page's own origin (or one of `allow_origins`). Sessions are bounded
per server and per client address; everything a client sends is bytes, never a path.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse

from livetalk_cli.errors import UserError
from livetalk_cli.pipeline import LoadedModel
from livetalk_cli.serve.engine import Engine
from livetalk_cli.serve.live import Pacing
from livetalk_cli.serve.protocol import PROTOCOL_VERSION, Limits, ProtocolError
from livetalk_cli.serve.responders import Responder

if TYPE_CHECKING:
    from livetalk_cli.serve.connection import Connection

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
IO_THREADS = 4


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_sessions: int = 2
    responder: Responder = field(default_factory=Responder)
    limits: Limits = field(default_factory=Limits)
    pacing: Pacing = field(default_factory=Pacing)
    threads: int | None = None  # the engine thread's intra-op threads (CPU); None: half the cores (engine.py)
    allow_origins: tuple[str, ...] = ()

    def check(self) -> None:
        if self.host not in LOOPBACK and not self.token:
            raise UserError(f"--host {self.host} is reachable from other machines: set --token")
        if self.max_sessions < 1:
            raise UserError("--max-sessions must be at least 1")


class Server:
    """What the connections share: the model, the engine thread, the session count."""

    def __init__(self, model: LoadedModel, config: ServerConfig):
        self.model, self.config = model, config
        self.engine = Engine(threads=config.threads)
        # media decoding/encoding and responders, off the event loop; bounded (IO_THREADS)
        self.io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="livetalk-io")
        self.connections: set[Connection] = set()
        self.per_client: Counter[str] = Counter()

    def active(self) -> int:
        return len(self.connections)

    def admit(self, conn: Connection) -> None:
        client = _client(conn)
        if self.active() >= self.config.max_sessions:
            raise ProtocolError("busy", f"the server is busy: {self.active()} of {self.config.max_sessions} "
                                "sessions in use; try again later")
        if self.per_client[client] >= self.config.limits.max_sessions_per_client:
            raise ProtocolError("busy", f"at most {self.config.limits.max_sessions_per_client} sessions per client")
        self.connections.add(conn)
        self.per_client[client] += 1

    def release(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            client = _client(conn)
            self.per_client[client] -= 1
            if self.per_client[client] <= 0:
                del self.per_client[client]

    def authorized(self, token: str | None) -> bool:
        want = self.config.token
        return want is None or (token is not None and hmac.compare_digest(token.encode(), want.encode()))

    def origin_ok(self, origin: str | None, host: str | None) -> bool:
        """Programs send no Origin; a browser's must be this server's own (or an allowed one)."""
        if origin is None:
            return True
        return urlsplit(origin).netloc == host or origin in self.config.allow_origins


def _client(conn: Connection) -> str:
    """The address a connection came from (what the per-client session limit counts)."""
    return conn.ws.client.host if conn.ws.client else "?"


def create_app(model: LoadedModel, config: ServerConfig) -> FastAPI:
    from livetalk_cli.serve.connection import Connection

    server = Server(model, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        server.engine.start()
        yield
        await asyncio.to_thread(server.engine.stop)
        server.io_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="livetalk serve-local", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    page = (files("livetalk_cli.serve") / "static" / "index.html").read_text()

    def token_of(headers: Any, query: Any) -> str | None:
        auth = headers.get("authorization", "")
        return auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else query.get("token")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/v1/health")
    async def health(request: Request) -> JSONResponse:
        if not server.authorized(token_of(request.headers, request.query_params)):
            return JSONResponse({"error": "missing or wrong token"}, status_code=401)
        return JSONResponse({"protocol": PROTOCOL_VERSION, "model": model.source, "preset": model.cfg.name,
                             "fps": model.cfg.fps, "sessions": server.active(),
                             "max_sessions": config.max_sessions})

    @app.websocket("/v1/ws")
    async def ws(websocket: WebSocket) -> None:
        if not server.authorized(token_of(websocket.headers, websocket.query_params)):
            await websocket.close(code=4401, reason="missing or wrong token")
            return
        if not server.origin_ok(websocket.headers.get("origin"), websocket.headers.get("host")):
            await websocket.close(code=4403, reason="cross-origin WebSocket refused")
            return
        await websocket.accept()
        await Connection(websocket, server).run()

    return app


def _uvicorn(model: LoadedModel, config: ServerConfig, log_level: str) -> Any:
    import uvicorn

    app = create_app(model, config)
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                         ws_max_size=config.limits.max_message_bytes, lifespan="on",
                                         ws_ping_interval=20.0, ws_ping_timeout=20.0))


def run_server(model: LoadedModel, config: ServerConfig, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    config.check()
    _uvicorn(model, config, log_level).run()


@contextmanager
def serve_in_thread(model: LoadedModel, config: ServerConfig, log_level: str = "warning") -> Iterator[str]:
    """A server on a free loopback port in a background thread → its base URL (tests, bench)."""
    config.check()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, 0))
    port = sock.getsockname()[1]
    server = _uvicorn(model, config, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="livetalk-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.02)
        yield f"http://{config.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
