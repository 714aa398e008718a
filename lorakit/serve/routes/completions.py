"""``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed or whole.

Both turn the request into prompt ids (a chat through the tokenizer's chat template, with
:func:`lorakit.data.tokenize.prompt_ids`; a completion prompt as its text or token ids), submit
one :class:`~lorakit.serve.engine.Request` to the engine and read its events
(``("delta", text)``, ``("error", message)``, ``("finish", reason)``) from an asyncio queue.
Every answered request is counted in the Prometheus metrics and, when the server has one,
written to the request log.

Tokenizing and rendering the chat template run on a worker thread (a huge prompt never stalls
the event loop, so ``/health`` keeps answering); each request gets the server's deadline
(``--request-timeout``); a non-streaming client that disconnects has its generation cancelled
(the handler polls for the disconnect while it waits), a streaming one too (its generator is
closed).
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from lorakit.data.tokenize import has_chat_template, prompt_ids
from lorakit.errors import ConfigError
from lorakit.serve.auth import can_use, caller_of, metrics_label
from lorakit.serve.engine import (EngineStopped, ModelNotFound, PromptTooLong, Request,
                                  SamplingParams)
from lorakit.serve.protocol import (SSE_DONE, APIError, ChatCompletionRequest, CompletionRequest,
                                    GenerationRequest, completion_response, error_body,
                                    message_dict, sse, stream_chunk, usage, usage_chunk)

router = APIRouter(prefix="/v1")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
    engine = http.app.state.engine
    messages = [message_dict(m) for m in body.messages]
    if not has_chat_template(engine.tokenizer):
        raise APIError(400, f"the model {engine.base_name!r} has no chat template; use "
                            f"/v1/completions with a plain prompt")
    try:
        ids = await run_in_threadpool(prompt_ids, engine.tokenizer, messages)
    except Exception as exc:  # noqa: BLE001 - template errors are the client's messages
        raise APIError(400, f"messages could not be rendered with the chat template: {exc}",
                       param="messages") from None
    return await _generate(http, body, ids, "chat.completions", messages)


@router.post("/completions")
async def completions(body: CompletionRequest, http: HTTPRequest):
    tokenizer = http.app.state.engine.tokenizer
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (send a list of one string)",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = (await run_in_threadpool(tokenizer, prompt, add_special_tokens=True))["input_ids"]
    else:
        ids = list(prompt)
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return await _generate(http, body, ids, "completions", body.prompt)


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 503: "server_error",
                504: "timeout_error"}


def _model_not_found(exc: ModelNotFound) -> APIError:
    return APIError(404, str(exc), "not_found_error", param="model", code="model_not_found")


def _error_of(event: tuple) -> tuple[int, str, str]:
    """(status, message, type) of an engine ``("error", message[, status])`` event."""
    status = event[2] if len(event) > 2 else 500
    return status, event[1], _ERROR_TYPES.get(status, "server_error")


async def _generate(http: HTTPRequest, body: GenerationRequest, ids: list[int], endpoint: str,
                    prompt):
    """Submit the request; answer it whole, or as a stream of Server-Sent Events."""
    engine, state = http.app.state.engine, http.app.state
    start, created = time.perf_counter(), int(time.time())
    chat = endpoint.startswith("chat")
    caller = caller_of(http)
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported)
    try:  # another owner's adapter reads as not existing; the message names only visible ones
        adapter = engine.resolve_model(body.model, lambda entry: can_use(entry, caller))
    except ModelNotFound as exc:
        raise _model_not_found(exc) from None
    label = metrics_label(engine.adapter(adapter) if adapter else None, body.model, state.keys)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # OpenAI: 16 for completions; vLLM: the rest of the context
        max_tokens = 16 if endpoint == "completions" else max(1, engine.max_model_len - len(ids))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                            top_p=body.top_p, stop=stop, seed=body.seed,
                            ignore_eos=body.ignore_eos)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    timeout = state.limits.request_timeout
    request = Request(ids, adapter, params,
                      lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                      deadline=time.monotonic() + timeout if timeout else None)
    try:
        engine.submit(request)
    except PromptTooLong as exc:
        _record(state, label, endpoint, adapter, len(ids), 0, start, 400, None, prompt, None)
        raise APIError(400, str(exc), param="messages" if chat else "prompt",
                       code="context_length_exceeded") from None
    except EngineStopped as exc:
        raise APIError(503, str(exc), "server_error") from None
    except ConfigError as exc:
        raise APIError(400, str(exc)) from None
    except ModelNotFound as exc:  # unloaded between the lookup and the submit
        raise _model_not_found(exc) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(state, request, events, rid, created, body.model, endpoint, include_usage,
                    start, prompt, label),
            media_type="text/event-stream")
    pieces, finish = [], None
    checked = time.monotonic()
    try:
        while finish is None:
            try:
                event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await http.is_disconnected():  # the client gave up: stop generating for it
                    request.cancel()
                    used = _usage(request)
                    _record(state, label, endpoint, adapter, used["prompt_tokens"],
                            used["completion_tokens"], start, 499, None, prompt, None, request)
                    return Response(status_code=499)
            if event is None:
                continue
            kind, value = event[0], event[1]
            if kind == "delta":
                pieces.append(value)
            elif kind == "error":
                status, message, type_ = _error_of(event)
                _record(state, label, endpoint, adapter, len(ids), 0, start, status, None,
                        prompt, None)
                raise APIError(status, message, type_)
            else:
                finish = value
    except asyncio.CancelledError:
        request.cancel()
        raise
    text = "".join(pieces)
    used = _usage(request)
    _record(state, label, endpoint, adapter, used["prompt_tokens"],
            used["completion_tokens"], start, 200, finish, prompt, text, request)
    return completion_response(rid, created, body.model, chat, text, finish, used)


DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming handler looks for a disconnect


async def _stream(state, request: Request, events: asyncio.Queue, rid: str, created: int,
                  model: str, endpoint: str, include_usage: bool, start: float, prompt,
                  label: str):
    """The events of one request as SSE lines; a client that goes away cancels its request."""
    chat = endpoint.startswith("chat")
    pieces, status, finish = [], 200, None
    try:
        if chat:
            yield stream_chunk(rid, created, model, chat, None, first=True,
                               include_usage=include_usage)
        while True:
            event = await events.get()
            kind, value = event[0], event[1]
            if kind == "delta":
                pieces.append(value)
                yield stream_chunk(rid, created, model, chat, value, include_usage=include_usage)
            elif kind == "error":
                status, message, type_ = _error_of(event)
                yield sse(error_body(message, type_))
                break
            else:
                finish = value
                yield stream_chunk(rid, created, model, chat, None if chat else "", finish=finish,
                                   include_usage=include_usage)
                break
        if include_usage and status == 200:
            yield usage_chunk(rid, created, model, chat, _usage(request))
        yield SSE_DONE
    finally:
        if finish is None:  # the client went away (or an error): stop generating for it
            request.cancel()
            status = status if status != 200 else 499
        used = _usage(request)
        _record(state, label, endpoint, request.adapter, used["prompt_tokens"],
                used["completion_tokens"], start, status, finish, prompt, "".join(pieces),
                request)


def _usage(request: Request) -> dict:
    return usage(len(request.prompt_ids), len(request.output_ids))


def _record(state, model: str, endpoint: str, adapter: str | None, prompt_tokens: int,
            completion_tokens: int, start: float, status: int, finish: str | None, prompt,
            completion: str | None, request: Request | None = None) -> None:
    """Count the request in the metrics and write it to the request log (when there is one)."""
    latency = time.perf_counter() - start
    ttft = (request.first_token_at - request.submitted) if request and request.first_token_at \
        else None
    state.metrics.observe(model, status, prompt_tokens, completion_tokens, latency, ttft)  # label
    if state.request_log is not None:
        state.request_log.log(endpoint=endpoint, adapter=adapter, prompt_tokens=prompt_tokens,
                              completion_tokens=completion_tokens, latency_s=latency,
                              status=status, finish_reason=finish, prompt=prompt,
                              completion=completion)
