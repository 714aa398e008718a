"""What one client may cost the server: body size, auth before the body, a deadline.

:class:`Limits` holds the numbers (``lorakit serve`` flags, docs/serve.md "Limits");
:class:`GuardMiddleware` is a pure ASGI middleware (no body buffering) in front of the whole
app that

- refuses a ``/v1`` request without a valid key with 401 *before its body is read* (a client
  without a key cannot make the server receive megabytes),
- refuses a body larger than the limit with 413: at once when ``Content-Length`` says so, and
  while the body streams in when it does not (chunked uploads), the connection's remaining
  body is never read.

Uploads (``/v1/files`` and the UI's ``/ui/files``) have their own, larger limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorakit.serve.auth import UNAUTHORIZED, KeyRing
from lorakit.serve.protocol import error_body

MiB = 1 << 20


@dataclass
class Limits:
    """Per-request limits.

    Attributes:
        max_body_bytes: largest request body outside uploads (``--max-body-bytes``).
        max_upload_bytes: largest ``/v1/files`` upload (``--max-upload-bytes``).
        request_timeout: seconds a generation may take, waiting included
            (``--request-timeout``; None: no deadline).
        upload_paths: path prefixes that take ``max_upload_bytes``.
    """

    max_body_bytes: int = 4 * MiB
    max_upload_bytes: int = 1024 * MiB
    request_timeout: float | None = 600.0
    upload_paths: tuple[str, ...] = ("/v1/files", "/ui/files")

    def body_limit(self, path: str) -> int:
        return self.max_upload_bytes if path.startswith(self.upload_paths) else \
            self.max_body_bytes


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": data})


class GuardMiddleware:
    """Auth before the body and body-size limits, as a pure ASGI middleware.

    Args:
        app: the ASGI app.
        keys: the server's :class:`~lorakit.serve.auth.KeyRing` (empty: no auth here).
        limits: the :class:`Limits`.
        guarded_prefix: paths whose key is checked here (the routes' own check stays).
    """

    def __init__(self, app, keys: KeyRing, limits: Limits, guarded_prefix: str = "/v1/"):
        self.app, self.keys, self.limits, self.prefix = app, keys, limits, guarded_prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.keys and path.startswith(self.prefix):
            caller = self.keys.from_headers(headers.get(b"authorization", b"").decode("latin-1"))
            if caller is None:
                return await _send_json(send, 401, error_body(
                    UNAUTHORIZED, "authentication_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
        limit = self.limits.body_limit(path)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_json(send, 400, error_body(
                    "Content-Length is not a number", "invalid_request_error"))
            if declared > limit:
                return await self._too_large(send, limit)
        received, state = 0, {"too_large": False, "started": False}

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    state["too_large"] = True
                    raise _TooLarge
            return message

        async def guarded_send(message):
            if state["too_large"]:
                return  # the app's answer to a body it could not read: ours goes instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not state["too_large"]:
                raise
        if state["too_large"] and not state["started"]:
            await self._too_large(send, limit)

    async def _too_large(self, send, limit: int) -> None:
        await _send_json(send, 413, error_body(
            f"request body larger than {limit} bytes (the server's --max-body-bytes / "
            f"--max-upload-bytes)", "invalid_request_error", code="request_too_large"))
