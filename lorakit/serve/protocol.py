"""What goes over the wire: request bodies, OpenAI's response and error shapes.

Request bodies are pydantic models (FastAPI validates them; unknown fields are accepted, as
clients send ``user`` and friends). Responses are plain dicts built here, in OpenAI's shapes:
a completion, a streamed chunk (``data: {...}`` lines of Server-Sent Events), usage, and the
error object ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, ...)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


MAX_TOKENS_LIMIT = 1 << 20  # above any context; the real bound is --max-model-len
SEED_RANGE = (-(2**63), 2**64 - 1)  # torch.Generator.manual_seed's range


class GenerationRequest(_Body):
    """The sampling fields both completion endpoints take. Every number has bounds (a value
    outside them is a 400 naming the field); fields lorakit does not implement are refused
    when they ask for something (``logprobs``, ``logit_bias``, ``best_of`` > 1) and accepted
    when neutral."""

    model: str = Field(max_length=512)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    best_of: int | None = Field(default=None, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    logprobs: bool | int | None = Field(default=None, ge=0, le=20)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)

    def unsupported(self) -> str | None:
        """The first field asking for something lorakit does not do (None: none)."""
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            return "logprobs"
        if self.logit_bias:
            return "logit_bias"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        return None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str]


class LoadLoraAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape (the app's handler turns it into the response)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    """OpenAI's error object; the message is made encodable (a lone surrogate from the
    client's own input would otherwise fail the JSON encoding of the answer)."""
    message = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------- requests -> engine
def message_dict(message: ChatMessage) -> dict:
    """A chat message as the chat template takes it; OpenAI's content parts become their text.

    Raises:
        APIError: 400 for a non-text content part (images, audio).
    """
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


# ---------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, created: int, model: str, chat: bool, text: str, finish: str,
                        usage: dict) -> dict:
    """The whole answer of a non-streamed request (``chat.completion`` / ``text_completion``)."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "usage": usage}


def stream_chunk(rid: str, created: int, model: str, chat: bool, delta_text: str | None,
                 finish: str | None = None, first: bool = False,
                 include_usage: bool = False) -> str:
    """One Server-Sent Event of a streamed answer. A chat stream opens with a chunk carrying
    only the assistant role (``first``); ``delta_text=None`` sends an empty delta."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else \
            ({"content": delta_text} if delta_text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
    payload = {"id": rid, "object": _chunk_object(chat), "created": created, "model": model,
               "choices": [choice]}
    if include_usage:
        payload["usage"] = None
    return sse(payload)


def usage_chunk(rid: str, created: int, model: str, chat: bool, usage: dict) -> str:
    """The last event of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return sse({"id": rid, "object": _chunk_object(chat), "created": created, "model": model,
                "choices": [], "usage": usage})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _chunk_object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"
