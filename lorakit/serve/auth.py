"""API keys and their owners: the one place a key is read, compared and turned into an owner.

A server has no key (open), one key (``--api-key`` or ``LORAKIT_API_KEY``, owner
``"default"``), or a keys file (``--keys-file``: each key mapped to an owner name, some marked
``admin``). The ``/v1`` routes read the key from ``Authorization: Bearer KEY``
(:func:`require_api_key`, and before the body is read, ``lorakit.serve.limits``); the web UI of
the fine-tuning service reads it from its session; all ask the app's :class:`KeyRing`
(``app.state.keys``) for the :class:`Caller`.

Who may do what with an adapter (:func:`can_use`, :func:`can_remove`; docs/serve.md,
"Owners"): the base and ``--adapter`` adapters have no owner: every key may list and use them,
only an admin key may unload them. Adapters loaded at runtime and fine-tuned models belong to
the key's owner that loaded them (or whose job made them): only that owner (and admins) may
list, use, unload or replace them; to everyone else they do not exist (404, absent from
``/v1/models``). The one key of ``--api-key`` and an open server act as admin.

This module imports fastapi at the top: FastAPI reads the dependency's annotation at module
level, and only the server imports this module.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from lorakit.data.jsonl import JSONRecordError, loads_record
from lorakit.errors import ConfigError
from lorakit.serve.protocol import APIError

DEFAULT_OWNER = "default"  # the owner of --api-key, and of everything on a server without keys


@dataclass(frozen=True)
class Caller:
    """Who is asking: the key's owner (None: a server without keys) and whether the key is an
    admin key (an open server's callers and ``--api-key``'s key are)."""

    owner: str | None
    admin: bool = False


OPEN = Caller(None, True)  # the caller on a server without keys


class KeyFile(dict):
    """What :func:`load_keys` returns: key -> owner, plus ``admins`` (the admin keys)."""

    def __init__(self, keys=(), admins=()):
        super().__init__(keys)
        self.admins = set(admins)


class KeyRing:
    """The server's API keys, each with its owner.

    Args:
        api_key: one key, owned by :data:`DEFAULT_OWNER`, an admin key (None: not set).
        api_keys: key -> owner (``--keys-file``); a :class:`KeyFile`'s ``admins`` are admin.
        admins: more admin keys.
    """

    def __init__(self, api_key: str | None = None, api_keys: dict[str, str] | None = None,
                 admins=()):
        admin_keys = set(admins) | set(getattr(api_keys, "admins", ()))
        self._keys = {k.encode(): Caller(owner, k in admin_keys)
                      for k, owner in (api_keys or {}).items()}
        self.tenants = bool(api_keys)  # several owners: adapters and models are per owner
        if api_key:
            self._keys[api_key.encode()] = Caller(DEFAULT_OWNER, True)

    def __bool__(self) -> bool:
        """Whether the server needs a key at all."""
        return bool(self._keys)

    def caller(self, given: str) -> Caller | None:
        """The caller of key ``given`` (None: not a key of this server). Every key is
        compared, each in constant time, so the timing says nothing about which key is close."""
        if not self._keys:
            return OPEN
        token, found = given.encode(), None
        for key, who in self._keys.items():
            if hmac.compare_digest(token, key):
                found = who
        return found

    def owner(self, given: str) -> str | None:
        """The owner of key ``given`` (None: not a key of this server)."""
        if not self._keys:
            return None
        found = self.caller(given)
        return found.owner if found else None

    def from_headers(self, authorization: str) -> Caller | None:
        """The caller of an ``Authorization: Bearer KEY`` header value (None: refused)."""
        scheme, _, token = (authorization or "").partition(" ")
        return self.caller(token.strip() if scheme.lower() == "bearer" else "")


def can_use(entry, caller: Caller) -> bool:
    """May ``caller`` list and use adapter ``entry`` (an
    :class:`~lorakit.serve.engine.AdapterEntry`; None: the base)?"""
    return entry is None or entry.owner is None or caller.admin or entry.owner == caller.owner


def can_remove(entry, caller: Caller) -> bool:
    """May ``caller`` unload (or replace) adapter ``entry``? Owned ones: their owner; the base's
    ``--adapter`` ones (no owner): only an admin key."""
    return caller.admin or (entry.owner is not None and entry.owner == caller.owner)


def metrics_label(entry, name: str, keys: "KeyRing") -> str:
    """The ``model`` label of ``/metrics`` (which anyone may read): a per-owner adapter of a
    server with a keys file is counted under ``private``; the base and public adapters under
    their name."""
    if entry is not None and entry.owner is not None and keys.tenants:
        return "private"
    return name


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: set ``request.state.owner`` from the bearer key (None when the
    server has no key).

    Raises:
        APIError: 401 ``invalid_api_key`` when the server has keys and the request's is not one.
    """
    keys: KeyRing = request.app.state.keys
    caller = keys.from_headers(request.headers.get("authorization", ""))
    if caller is None:
        raise APIError(401, UNAUTHORIZED, "authentication_error", code="invalid_api_key")
    request.state.owner, request.state.caller = caller.owner, caller


UNAUTHORIZED = ("Incorrect API key provided. Pass it as 'Authorization: Bearer KEY' (the key "
                "the server was started with).")


def caller_of(request) -> Caller:
    """The caller :func:`require_api_key` found (an open server's caller if none ran)."""
    return getattr(request.state, "caller", None) or OPEN


def api_key_from_env(api_key: str | None) -> str | None:
    """The key from ``--api-key`` or the ``LORAKIT_API_KEY`` environment variable."""
    return api_key or os.environ.get("LORAKIT_API_KEY") or None


def load_keys(path: str | os.PathLike) -> KeyFile:
    """Read a keys file: ``KEY OWNER`` per line (``#`` comments; ``KEY OWNER admin`` marks an
    admin key), or a JSON object whose values are ``"OWNER"`` or
    ``{"owner": "OWNER", "admin": true}``.

    Raises:
        ConfigError: missing file, a malformed line (with its number), or no key at all.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--keys-file {file}: no such file")
    text = file.read_text()
    if text.lstrip().startswith("{"):
        try:  # the project's one JSON reader: hostile nesting or numbers are a clear error
            keys = loads_record(text)
        except JSONRecordError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(keys, dict):
            raise ConfigError(f"{file}: the JSON object must map API key strings to owner names")
        admins = set()
        for k, v in list(keys.items()):
            if isinstance(v, dict) and isinstance(v.get("owner"), str) and v["owner"] \
                    and isinstance(v.get("admin", False), bool) and set(v) <= {"owner", "admin"}:
                if v.get("admin"):
                    admins.add(k)
                keys[k] = v = v["owner"]
            if not (isinstance(k, str) and isinstance(v, str) and k and v):
                raise ConfigError(f"{file}: the JSON object must map API key strings to owner "
                                  f"names (or to {{\"owner\": NAME, \"admin\": true}})")
        keys = KeyFile(keys, admins)
    else:
        keys = KeyFile()
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(":", " ", 1).split() if " " not in line else line.split()
            if len(parts) == 3 and parts[2] == "admin":
                keys.admins.add(parts[0])
                parts = parts[:2]
            if len(parts) != 2:
                raise ConfigError(f"{file}:{n}: expected 'KEY OWNER' or 'KEY OWNER admin', got "
                                  f"{line!r}")
            keys[parts[0]] = parts[1]
    if not keys:
        raise ConfigError(f"{file}: no API keys in it")
    return keys
