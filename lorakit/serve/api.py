"""The HTTP server: FastAPI, OpenAI-compatible, with vLLM's shapes for adapter load/unload.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE
streaming ending with ``data: [DONE]``), ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter``, ``GET /health``, ``GET /metrics``.

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``.
Every ``/v1`` route needs ``Authorization: Bearer KEY`` when the server has an API key
(compared in constant time). ``/health`` and ``/metrics`` are open, as in vLLM.

Other features add routes to the same app: ``create_app(engine, extra_routers=[router])``
mounts each ``fastapi.APIRouter`` behind the same API-key check (``public_routers`` for
routes without it, e.g. static pages); handlers reach the engine as ``request.app.state.engine``.

This module imports fastapi at the top: only the server imports it (``import lorakit`` and
the CLI stay light), and FastAPI needs the annotation types at module level.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time
import uuid
from typing import Any, Literal, Sequence

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.serve.engine import Engine, ModelNotFound, PromptTooLong, Request, SamplingParams


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, ...)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    ignore_eos: bool = False  # vLLM's extension


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_GenerationBody):
    prompt: str | list[int] | list[str]


class LoadLoraAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(status: int, message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------- the app
def create_app(engine: Engine, *, api_key: str | None = None, request_log=None,
               extra_routers: Sequence[Any] = (), public_routers: Sequence[Any] = (),
               title: str = "lorakit", api_keys: dict[str, str] | None = None):
    """Build the FastAPI app around a started (or to-be-started) :class:`Engine`.

    Args:
        engine: the engine that generates; started with the app if it is not running.
        api_key: when set, ``/v1`` routes and ``extra_routers`` need ``Bearer <api_key>``.
        request_log: a :class:`lorakit.serve.monitor.RequestLog` (None: no request log).
        extra_routers: ``fastapi.APIRouter`` objects mounted behind the API-key check.
        public_routers: routers mounted without it.
        api_keys: several keys, each mapped to an owner name (``--keys-file``); the caller's
            owner is ``request.state.owner`` (None when the server has no key).

    Returns:
        The app; ``app.state.engine``, ``app.state.metrics``, ``app.state.request_log`` and
        ``app.state.require_api_key`` (a dependency) are there for other routers;
        ``app.state.model_visible(owner, model)`` decides which models an owner may list and
        use (everything by default; fine-tuning jobs make their models owner-only).
    """
    from contextlib import asynccontextmanager

    from lorakit.serve.metrics import ServeMetrics

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield

    app = FastAPI(title=title, lifespan=lifespan)
    metrics = ServeMetrics(engine)
    app.state.engine, app.state.metrics, app.state.request_log = engine, metrics, request_log
    keys = {k.encode(): owner for k, owner in (api_keys or {}).items()}
    if api_key:
        keys[api_key.encode()] = "default"

    async def require_api_key(request: HTTPRequest) -> None:
        request.state.owner = None
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        owner = None
        for key, who in keys.items():  # constant time per key; every key is compared
            if hmac.compare_digest(given, key):
                owner = who
        if owner is None:
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer "
                                "KEY' (the key the server was started with).",
                           "authentication_error", code="invalid_api_key")
        request.state.owner = owner

    app.state.require_api_key = require_api_key
    app.state.model_visible = lambda owner, model: True

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(error_body(exc.status, exc.message, exc.type, exc.param, exc.code),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else \
            first.get("msg", "invalid request")
        return JSONResponse(error_body(400, message, "invalid_request_error", where or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(exc.status_code, str(exc.detail), kind),
                            status_code=exc.status_code)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def list_models(http: HTTPRequest):
        owner = getattr(http.state, "owner", None)
        base = {"id": engine.base_name, "object": "model", "created": engine.created,
                "owned_by": "lorakit", "root": engine.base_name, "parent": None,
                "max_model_len": engine.max_model_len}
        data = [base] + [{"id": name, "object": "model", "created": engine.created,
                          "owned_by": "lorakit", "root": str(path), "parent": engine.base_name,
                          "max_model_len": engine.max_model_len}
                         for name, path in engine.adapters().items()
                         if app.state.model_visible(owner, name)]
        return {"object": "list", "data": data}

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraAdapterRequest):
        if not body.lora_name or not body.lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if body.lora_name in engine.adapters():
            raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.")
        try:
            await run_in_threadpool(engine.add_adapter, body.lora_name, body.lora_path,
                                    check_root=True)
        except AdapterError as exc:
            raise APIError(400, str(exc)) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
        try:
            engine.remove_adapter(body.lora_name)
        except ModelNotFound as exc:
            raise APIError(404, str(exc), "not_found_error") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        messages = [_message_dict(m) for m in body.messages]
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model {engine.base_name!r} has no chat template; use "
                                f"/v1/completions with a plain prompt")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's messages
            raise APIError(400, f"messages could not be rendered with the chat template: {exc}",
                           param="messages") from None
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return await _generate(http, body, list(ids), "chat.completions", messages)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (send a list of one string)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = list(prompt)
            vocab = len(engine.tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await _generate(http, body, ids, "completions", body.prompt)

    async def _generate(http, body: _GenerationBody, ids: list[int], endpoint: str, prompt):
        start, created = time.perf_counter(), int(time.time())
        if not app.state.model_visible(getattr(http.state, "owner", None), body.model):
            raise APIError(404, f"The model `{body.model}` does not exist.", "not_found_error",
                           param="model", code="model_not_found")
        adapter = _resolve(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # OpenAI: 16 for completions; vLLM: the rest of the context
            max_tokens = 16 if endpoint == "completions" else max(1, engine.max_model_len - len(ids))
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                top_p=body.top_p, stop=stop, seed=body.seed,
                                ignore_eos=body.ignore_eos)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = Request(ids, adapter, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        try:
            engine.submit(request)
        except PromptTooLong as exc:
            _record(body.model, endpoint, adapter, len(ids), 0, start, 400, None, prompt, None)
            raise APIError(400, str(exc), param="messages" if endpoint.startswith("chat") else
                           "prompt", code="context_length_exceeded") from None
        except ConfigError as exc:
            raise APIError(400, str(exc)) from None
        except ModelNotFound as exc:
            raise APIError(404, str(exc), "not_found_error", param="model",
                           code="model_not_found") from None
        rid = ("chatcmpl-" if endpoint.startswith("chat") else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(http, request, events, rid, created, body.model, endpoint, include_usage,
                        start, prompt),
                media_type="text/event-stream")
        pieces, finish = [], None
        try:
            while finish is None:
                kind, value = await events.get()
                if kind == "delta":
                    pieces.append(value)
                elif kind == "error":
                    _record(body.model, endpoint, adapter, len(ids), 0, start, 500, None, prompt, None)
                    raise APIError(500, value, "server_error")
                else:
                    finish = value
        except asyncio.CancelledError:
            request.cancel()
            raise
        text = "".join(pieces)
        usage = _usage(request)
        _record(body.model, endpoint, adapter, usage["prompt_tokens"], usage["completion_tokens"],
                start, 200, finish, prompt, text, request)
        if endpoint.startswith("chat"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": body.model,
                "choices": [choice], "usage": usage}

    async def _stream(http, request: Request, events, rid, created, model, endpoint,
                      include_usage, start, prompt):
        chat = endpoint.startswith("chat")
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, finish=None, first=False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": delta_text} if delta_text is not None else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None,
                          "finish_reason": finish}
            payload = {"id": rid, "object": obj, "created": created, "model": model,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        pieces, status, finish = [], 200, None
        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    pieces.append(value)
                    yield chunk(value)
                elif kind == "error":
                    status = 500
                    yield f"data: {json.dumps(error_body(500, value, 'server_error'))}\n\n"
                    break
                else:
                    finish = value
                    yield chunk(None if chat else "", finish=finish)
                    break
            if include_usage and status == 200:
                payload = {"id": rid, "object": obj, "created": created, "model": model,
                           "choices": [], "usage": _usage(request)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if finish is None:  # the client went away (or an error): stop generating for it
                request.cancel()
                status = status if status != 200 else 499
            usage = _usage(request)
            _record(model, endpoint, request.adapter, usage["prompt_tokens"],
                    usage["completion_tokens"], start, status, finish, prompt, "".join(pieces),
                    request)

    def _resolve(model: str) -> str | None:
        try:
            return engine.resolve_model(model)
        except ModelNotFound as exc:
            raise APIError(404, str(exc), "not_found_error", param="model",
                           code="model_not_found") from None

    def _record(model, endpoint, adapter, prompt_tokens, completion_tokens, start, status,
                finish, prompt, completion, request: Request | None = None):
        latency = time.perf_counter() - start
        ttft = (request.first_token_at - request.submitted) if request and request.first_token_at \
            else None
        metrics.observe(model, status, prompt_tokens, completion_tokens, latency, ttft)
        if request_log is not None:
            request_log.log(endpoint=endpoint, adapter=adapter, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, latency_s=latency,
                            status=status, finish_reason=finish, prompt=prompt,
                            completion=completion)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/metrics")
    async def prometheus_metrics():
        data, content_type = metrics.render()
        return Response(content=data, media_type=content_type)

    app.include_router(v1)
    for router in extra_routers:
        app.include_router(router, dependencies=[Depends(require_api_key)])
    for router in public_routers:
        app.include_router(router)
    return app


def _message_dict(message: ChatMessage) -> dict:
    content = message.content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = []
        for part in content:
            if part.get("type") != "text":
                raise APIError(400, f"content part type {part.get('type')!r} is not supported "
                                    f"(text only)", param="messages")
            parts.append(str(part.get("text", "")))
        content = "".join(parts)
    return {"role": message.role, "content": content or ""}


def _usage(request: Request) -> dict:
    prompt, completion = len(request.prompt_ids), len(request.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# ---------------------------------------------------------------------- running it
class ServerThread:
    """Run an app with uvicorn in a background thread on ``host``:``port`` (0 = a free port).

    Used by the tests and benchmarks (a real HTTP server on loopback); ``lorakit serve`` runs
    uvicorn in the foreground instead.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
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


def check_api_key_source(api_key: str | None) -> str | None:
    """The key from ``--api-key`` or the ``LORAKIT_API_KEY`` environment variable."""
    import os

    return api_key or os.environ.get("LORAKIT_API_KEY") or None


__all__ = ["create_app", "ServerThread", "APIError", "LorakitError"]
