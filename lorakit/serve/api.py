"""The HTTP server: FastAPI, OpenAI-compatible, with vLLM's shapes for adapter load/unload.

Routes (one router per area under ``routes/``; bodies and response shapes in ``protocol.py``):
``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming
ending with ``data: [DONE]``), ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``GET /health``, ``GET /metrics``.

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.
Every ``/v1`` route needs ``Authorization: Bearer KEY`` when the server has an API key
(compared in constant time, ``auth.py``), checked before the request body is read, and bodies
are size-limited (``limits.py``). ``/health`` and ``/metrics`` are open, as in vLLM; their
labels never name another owner's adapters.

Other features add routes to the same app: ``create_app(engine, extra_routers=[router])``
mounts each ``fastapi.APIRouter`` behind the same API-key check (``public_routers`` for
routes without it, e.g. static pages), or they include their routers later with
``dependencies=[Depends(app.state.require_api_key)]``; handlers reach the engine as
``request.app.state.engine``.

This module imports fastapi at the top: only the server imports it (``import lorakit`` and
the CLI stay light).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Sequence

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serve.auth import Caller, KeyRing, can_use, require_api_key
from lorakit.serve.engine import Engine
from lorakit.serve.limits import GuardMiddleware, Limits
from lorakit.serve.protocol import APIError, error_body


def create_app(engine: Engine, *, api_key: str | None = None, request_log=None,
               extra_routers: Sequence[Any] = (), public_routers: Sequence[Any] = (),
               title: str = "lorakit", api_keys: dict[str, str] | None = None,
               limits: Limits | None = None):
    """Build the FastAPI app around a started (or to-be-started) :class:`Engine`.

    Args:
        engine: the engine that generates; started with the app if it is not running.
        api_key: when set, ``/v1`` routes and ``extra_routers`` need ``Bearer <api_key>``.
        request_log: a :class:`lorakit.serve.monitor.RequestLog` (None: no request log).
        extra_routers: ``fastapi.APIRouter`` objects mounted behind the API-key check.
        public_routers: routers mounted without it.
        api_keys: several keys, each mapped to an owner name (``--keys-file``; a
            :class:`~lorakit.serve.auth.KeyFile` also says which are admin keys); the caller's
            owner is ``request.state.owner`` (None when the server has no key) and
            ``request.state.caller`` the :class:`~lorakit.serve.auth.Caller`.
        limits: body sizes and the request deadline (:class:`~lorakit.serve.limits.Limits`).

    Returns:
        The app; ``app.state.engine``, ``app.state.metrics``, ``app.state.request_log``,
        ``app.state.keys`` (the :class:`~lorakit.serve.auth.KeyRing`) and
        ``app.state.require_api_key`` (a dependency) are there for other routers;
        ``app.state.shutdown_hooks`` (callables run when the server shuts down);
        ``app.state.model_visible(owner, model)`` decides which models an owner may list and
        use (the adapter's owner, :func:`lorakit.serve.auth.can_use`).
    """
    from contextlib import asynccontextmanager

    from lorakit.serve.metrics import ServeMetrics
    from lorakit.serve.routes import completions, health, models

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn re-raises SIGTERM once the app has shut down, so what must run at exit (the
        # CLI's engine and jobs stop) runs here, not after uvicorn.run returns
        for hook in app.state.shutdown_hooks:
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(hook)

    app = FastAPI(title=title, lifespan=lifespan)
    app.state.engine, app.state.request_log = engine, request_log
    app.state.metrics = ServeMetrics(engine)
    app.state.keys = keys = KeyRing(api_key, api_keys)
    app.state.limits = limits = limits or Limits()
    app.state.require_api_key = require_api_key
    app.state.shutdown_hooks = []  # callables run (in order) when the server shuts down
    app.state.model_visible = lambda owner, model, admin=False: model == engine.base_name or \
        can_use(engine.adapter(model), Caller(owner, admin or not keys))
    app.add_middleware(GuardMiddleware, keys=keys, limits=limits)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else \
            first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", where or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    guarded = [Depends(require_api_key)]
    app.include_router(models.router, dependencies=guarded)
    app.include_router(completions.router, dependencies=guarded)
    app.include_router(health.router)
    for router in extra_routers:
        app.include_router(router, dependencies=guarded)
    for router in public_routers:
        app.include_router(router)
    return app


# ---------------------------------------------------------------------- running it
class ServerThread:
    """Run an app with uvicorn in a background thread on ``host``:``port`` (0 = a free port).

    Used by the tests and benchmarks (a real HTTP server on loopback); ``lorakit serve`` runs
    uvicorn in the foreground instead.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 10):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="lorakit-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["create_app", "ServerThread", "APIError"]
