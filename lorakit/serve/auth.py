"""API keys and their owners: the one place a key is read, compared and turned into an owner.

A server has no key (open), one key (``--api-key`` or ``LORAKIT_API_KEY``, owner
``"default"``), or a keys file (``--keys-file``: each key mapped to an owner name). The
``/v1`` routes read the key from ``Authorization: Bearer KEY`` (:func:`require_api_key`); the
web UI of the fine-tuning service reads it from its cookie; both ask the app's
:class:`KeyRing` (``app.state.keys``) for the owner.

This module imports fastapi at the top: FastAPI reads the dependency's annotation at module
level, and only the server imports this module.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from fastapi import Request

from lorakit.errors import ConfigError
from lorakit.serve.protocol import APIError

DEFAULT_OWNER = "default"  # the owner of --api-key, and of everything on a server without keys


class KeyRing:
    """The server's API keys, each with its owner.

    Args:
        api_key: one key, owned by :data:`DEFAULT_OWNER` (None: not set).
        api_keys: key -> owner (``--keys-file``).
    """

    def __init__(self, api_key: str | None = None, api_keys: dict[str, str] | None = None):
        self._keys = {k.encode(): owner for k, owner in (api_keys or {}).items()}
        if api_key:
            self._keys[api_key.encode()] = DEFAULT_OWNER

    def __bool__(self) -> bool:
        """Whether the server needs a key at all."""
        return bool(self._keys)

    def owner(self, given: str) -> str | None:
        """The owner of key ``given`` (None: not a key of this server). Every key is compared,
        each in constant time, so the answer's timing says nothing about which key is close."""
        token, found = given.encode(), None
        for key, who in self._keys.items():
            if hmac.compare_digest(token, key):
                found = who
        return found


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: set ``request.state.owner`` from the bearer key (None when the
    server has no key).

    Raises:
        APIError: 401 ``invalid_api_key`` when the server has keys and the request's is not one.
    """
    request.state.owner = None
    keys: KeyRing = request.app.state.keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    owner = keys.owner(token.strip() if scheme.lower() == "bearer" else "")
    if owner is None:
        raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer "
                            "KEY' (the key the server was started with).",
                       "authentication_error", code="invalid_api_key")
    request.state.owner = owner


def api_key_from_env(api_key: str | None) -> str | None:
    """The key from ``--api-key`` or the ``LORAKIT_API_KEY`` environment variable."""
    return api_key or os.environ.get("LORAKIT_API_KEY") or None


def load_keys(path: str | os.PathLike) -> dict[str, str]:
    """Read a keys file: ``KEY OWNER`` per line (``#`` comments), or a JSON object
    ``{"KEY": "OWNER"}``.

    Raises:
        ConfigError: missing file, a malformed line (with its number), or no key at all.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--keys-file {file}: no such file")
    text = file.read_text()
    if text.lstrip().startswith("{"):
        try:
            keys = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in keys.items()):
            raise ConfigError(f"{file}: the JSON object must map API key strings to owner names")
    else:
        keys = {}
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(":", " ", 1).split() if " " not in line else line.split()
            if len(parts) != 2:
                raise ConfigError(f"{file}:{n}: expected 'KEY OWNER', got {line!r}")
            keys[parts[0]] = parts[1]
    if not keys:
        raise ConfigError(f"{file}: no API keys in it")
    return keys
