"""Durable file writes, and write errors a user can act on.

Every file lorakit writes for later (checkpoints, adapters, run state) goes through
:func:`atomic_write`: a temporary name in the same folder, fsync, rename into place, then an
fsync of the folder so the rename itself survives a power cut. A crash at any point leaves the
old file or the new one, never half of one.

A failed write (disk full, permission denied, read-only file system) raises :class:`OSError`
whose ``filename`` is the path that was being written (not the temporary name);
:func:`explain_write_errors` turns it into a one-line :class:`WriteError` (a
:class:`~lorakit.errors.LorakitError`, so the CLI prints it without a traceback).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lorakit.errors import LorakitError


class WriteError(LorakitError):
    """A file could not be written (disk full, no permission, read-only file system)."""


class _FdWriter(io.RawIOBase):
    """A raw, unbuffered writer over a file descriptor that writes with :func:`os.write`."""

    def __init__(self, fd: int):
        self.fd, self.discard = fd, False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.discard:
            return len(data)
        return os.write(self.fd, data)


def fsync_dir(folder: Path) -> None:
    """Make the renames and new entries in ``folder`` durable (POSIX: fsync the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. a platform that cannot open folders: nothing more to do
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno_codes.EINVAL, errno_codes.EBADF):  # not supported here
            raise
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder (deepest first): what a library
    wrote there without fsync (e.g. ``save_pretrained``) is on disk before a rename commits it."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for sub in sorted({p.parent for p in files} | {folder}, key=lambda p: -len(p.parts)):
        fsync_dir(sub)


def atomic_write(path: Path, write: Callable, *, durable: bool = True) -> None:
    """Write ``path`` through ``write(file)`` (a binary file object) under a temporary name in
    the same folder, fsync it, rename it into place and fsync the folder.

    Raises:
        OSError: the write failed; ``filename`` is ``path``. The temporary file is removed and
            an older ``path`` is left as it was.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    raw = _FdWriter(fd)
    try:
        writer = io.BufferedWriter(raw, buffer_size=1 << 20)
        write(writer)
        writer.flush()
        if durable:
            os.fsync(fd)
        os.close(fd)
        raw.fd = -1
        os.replace(tmp, path)
    except BaseException as exc:
        raw.discard = True  # the buffer's last flush (at garbage collection) must not raise
        if raw.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj, **dump_kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}) + "\n")


def open_append(path: Path) -> int:
    """Open ``path`` for appending (created if missing) and return the descriptor for
    :func:`append_line`; ``OSError`` names ``path``."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _naming(exc, Path(path)) from None


def append_line(fd: int, line: str, path: Path) -> None:
    """Append one line to an open (``O_APPEND``) file; ``OSError`` names ``path``."""
    data = line.encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError as exc:
        raise _naming(exc, path) from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final`` (replacing an older one) durably: its
    entries are fsynced first, the parent after the rename."""
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``filename`` set to ``path`` (the file the caller meant, not a temporary)."""
    if exc.errno is None:
        return exc
    new = type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))
    new.__traceback__ = exc.__traceback__
    return new


def describe(exc: OSError, *, hint: str = "", aliases: dict | None = None) -> str:
    """``could not write PATH: No space left on device (errno 28); HINT``. ``aliases`` maps
    temporary folders (as strings) to the names the user knows them by."""
    name = str(exc.filename) if exc.filename is not None else "a file"
    for tmp, final in (aliases or {}).items():
        name = name.replace(str(tmp), str(final))
    reason = exc.strerror or os.strerror(exc.errno) if exc.errno else str(exc)
    code = f" (errno {exc.errno})" if exc.errno else ""
    if not hint:
        hint = ("free space or write elsewhere"
                if exc.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT)
                else "check the folder's permissions or write elsewhere")
    return f"could not write {name}: {reason}{code}; {hint}"


@contextlib.contextmanager
def explain_write_errors(error_class=WriteError, *, hint=None, aliases: dict | None = None):
    """Within this block an :class:`OSError` (a failed write) becomes ``error_class`` with a
    one-line message naming the path (:func:`describe`). ``hint(exc) -> str`` says what to
    do. Errors that are already lorakit's pass through."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, LorakitError) or exc.errno is None:
            raise
        raise error_class(describe(exc, hint=hint(exc) if hint else "",
                                   aliases=aliases)) from None
