"""The one reader of JSON Lines and JSON-array record files: hostile input becomes a reported line.

Every data file lorakit reads (``data check``, ``train``, the jobs service's uploads, the
serve monitor) goes through :func:`read_jsonl_records`. It yields one ``(line, record, issue)``
per record; a record it cannot accept is yielded with ``record=None`` and a :class:`DataIssue`
naming the file, the line and the field, never raised as a traceback and never skipped
silently. Blank lines are not records.

Layout (``layout="auto"`` decides from the file name):

* ``.jsonl`` / ``.ndjson``: one JSON object per line, each line on its own. A line holding a
  JSON list is an error ("a .jsonl file holds one object per line; for a JSON array use
  .json"), and the lines after it are still read.
* ``.json`` and any other name: a JSON array of objects (``[...]``, may span many lines;
  each element keeps the line it starts on) when the first non-blank character is ``[``,
  otherwise JSON lines as above. A syntax error inside an array stops the reading there and
  says so ("the rest of this file was not read"), as does anything after the closing ``]``.

What is refused, with the field where it sits (``messages[1].content``):

* nesting deeper than :data:`MAX_DEPTH` levels (checked before parsing: Python's json would
  raise ``RecursionError``);
* strings or keys that UTF-8 cannot encode: a lone surrogate escape (``"\\ud800"``) or bytes
  that are not UTF-8 (the rest of the file is still read);
* numbers Python cannot hold as JSON numbers: ``NaN`` / ``Infinity`` literals (not JSON),
  numbers that overflow a double (``1e999``) and integers of more than :data:`MAX_INT_DIGITS`
  digits;
* malformed JSON, and a line or element that is not an object.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from lorakit.errors import DataError

MAX_DEPTH = 100  # real records nest 3-5 levels (record > messages > message > content)
MAX_INT_DIGITS = 4300  # Python's own limit for int <-> str (sys.get_int_max_str_digits)
LAYOUTS = ("auto", "jsonl", "json")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_WS = " \t\r\n"

# a JSON string (escapes included); brackets inside one are not structure
_STRING = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_TOKEN = re.compile(r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"?|[\[\]{}]')
# a \uD800-\uDFFF escape: the only way valid UTF-8 text can decode to a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-]{1,40}")


@dataclass
class DataIssue:
    """One problem found in the input: where it is and what is wrong."""

    file: str
    line: int
    field: str
    message: str

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class JSONRecordError(DataError):
    """One JSON text could not be accepted (see :func:`loads_record`); ``field`` says where."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages (never huge, never
    an int that Python refuses to print)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
        text = repr(value)[:-1] + "..." + repr(value)[-1]
    else:
        text = repr(value)
        if len(text) > limit:
            text = text[:limit] + "..."
    return text


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: object, list, string, number, true/false, null."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "true/false"
    if value is None:
        return "null"
    return "number"


# ---------------------------------------------------------------- one JSON text


class _BadNumber:
    """Stands in for a number Python cannot hold; found afterwards with its field."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


class _Decoder:
    """A ``json.JSONDecoder`` whose number hooks mark what they refuse (``bad`` is then set)."""

    def __init__(self):
        self.bad = False
        self.json = json.JSONDecoder(parse_float=self._float, parse_int=self._int,
                                     parse_constant=self._constant)

    def _constant(self, name: str) -> _BadNumber:
        self.bad = True
        return _BadNumber(f"{name} is not valid JSON (numbers must be finite)")

    def _int(self, text: str) -> int | _BadNumber:
        digits = len(text) - text.startswith("-")
        if digits > MAX_INT_DIGITS:
            self.bad = True
            return _BadNumber(f"an integer of {digits} digits is too large (at most "
                              f"{MAX_INT_DIGITS})")
        return int(text)

    def _float(self, text: str) -> float | _BadNumber:
        value = float(text)
        if math.isinf(value):
            self.bad = True
            return _BadNumber(f"number {show(text, 24)[1:-1]} is out of range (beyond a double's "
                              "+-1.8e308)")
        return value


def _too_deep(text: str, limit: int, start: int = 0, end: int | None = None) -> bool:
    """Whether the brackets of ``text[start:end]`` (outside strings) nest deeper than ``limit``."""
    end = len(text) if end is None else end
    if text.count("[", start, end) + text.count("{", start, end) <= limit:
        return False  # the common case: too few brackets to be that deep
    import numpy as np

    bare = _NOT_BRACKET.sub("", _STRING.sub("", text[start:end]))
    codes = np.frombuffer(bare.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return bool(codes.size) and int(np.cumsum(steps).max()) > limit


def _value_end(text: str, start: int) -> int:
    """Index just after the array or object that starts at ``text[start]`` (``-1`` if it never
    closes); for values too deep for the json module to parse."""
    depth = 0
    for match in _TOKEN.finditer(text, start):
        char = text[match.start()]
        if char == '"':
            continue
        depth += 1 if char in "[{" else -1
        if depth == 0:
            return match.end()
    return -1


def _key_path(path: str, key: str) -> str:
    part = key if _PLAIN_KEY.fullmatch(key) else f"[{show(key)}]"
    return f"{path}.{part}" if path and not part.startswith("[") else f"{path}{part}"


def _unencodable(text: str, bad_bytes: bool) -> str | None:
    """Why ``text`` cannot be written as UTF-8, or ``None`` if it can."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if bad_bytes and 0xDC80 <= code <= 0xDCFF:  # how surrogateescape keeps a bad byte
            return f"not valid UTF-8 (byte 0x{code - 0xDC00:02x})"
        return (f"holds a lone surrogate \\u{code:04x} at character {exc.start + 1} (half of a "
                "UTF-16 pair); UTF-8 cannot encode it")


def _find_problem(value: Any, bad_bytes: bool) -> tuple[str, str] | None:
    """The first (field, message) in document order that cannot be accepted, or ``None``."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            why = _unencodable(node, bad_bytes)
            if why:
                return path, why
        elif isinstance(node, _BadNumber):
            return path, node.message
        elif isinstance(node, dict):
            children = []
            for key, child in node.items():
                why = _unencodable(key, bad_bytes)
                if why:
                    return path, f"key {show(key)}: {why}"
                children.append((child, _key_path(path, key)))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend((node[i], f"{path}[{i}]") for i in range(len(node) - 1, -1, -1))
    return None


def _depth_message(limit: int) -> str:
    return f"nested more than {limit} levels deep (lists or objects inside each other)"


def _loads(decoder: _Decoder, text: str, limit: int, bad_bytes: bool = False) -> Any:
    """Parse one JSON text (a JSONL line); raises :class:`JSONRecordError`."""
    if _too_deep(text, limit):
        raise JSONRecordError("", _depth_message(limit))
    decoder.bad = False
    try:
        try:  # the C scanner straight away: JSONDecoder.decode costs as much again per line
            value, end = decoder.json.scan_once(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):  # leading/trailing whitespace, or an error: decode() says which
            value = decoder.json.decode(text)
    except json.JSONDecodeError as exc:
        raise JSONRecordError("", f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise JSONRecordError("", _depth_message(limit)) from None
    _check_value(decoder, value, text, bad_bytes)
    return value


def _check_value(decoder: _Decoder, value: Any, text: str, bad_bytes: bool,
                 start: int = 0, end: int | None = None) -> None:
    end = len(text) if end is None else end
    suspect = text.find("\\u", start, end) >= 0 and _SURROGATE_ESCAPE.search(text, start, end)
    if decoder.bad or bad_bytes or suspect:
        problem = _find_problem(value, bad_bytes)
        if problem:
            raise JSONRecordError(*problem)


def loads_record(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON text under the rules of this module (depth, UTF-8, numbers).

    Args:
        text: the JSON text (``bytes`` must be UTF-8).
        max_depth: the deepest nesting accepted.

    Returns:
        The parsed value (any JSON type; :func:`read_jsonl_records` is the one that wants
        objects).

    Raises:
        JSONRecordError: (a :class:`~lorakit.errors.DataError`) with ``field`` and
            ``message``: malformed, too deep, not UTF-8, a lone surrogate, or a number out
            of range.
    """
    bad_bytes = False
    if isinstance(text, bytes):
        text, bad_bytes = _decode_line(text)
    try:
        return _loads(_Decoder(), text, max_depth, bad_bytes)
    except JSONRecordError as exc:
        if bad_bytes and not exc.message.startswith("not valid UTF-8"):
            raise JSONRecordError(exc.field, _utf8_message(text)) from None
        raise


def _decode_line(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape"), True


def _utf8_message(text: str) -> str:
    for i, char in enumerate(text):
        if 0xDC80 <= ord(char) <= 0xDCFF:
            return f"not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {i + 1})"
    return "not valid UTF-8"


# ---------------------------------------------------------------- files

Record = tuple[int, Any, "DataIssue | None"]


def _not_object(value: Any, layout: str) -> str:
    if layout == "jsonl" and isinstance(value, list):
        return ("a JSON list where a record (object) was expected; a .jsonl file holds one "
                "object per line (for a JSON array of records use a .json file)")
    return f"a JSON {json_type(value)} where a record (object) was expected"


def _records_jsonl(lines: Iterable[bytes], name: str, limit: int) -> Iterator[Record]:
    decoder = _Decoder()
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            raw = raw[3:]
        raw = raw.strip()
        if not raw:
            continue
        text, bad_bytes = _decode_line(raw)
        try:
            value = _loads(decoder, text, limit, bad_bytes)
        except JSONRecordError as exc:
            message = exc.message
            if bad_bytes and not message.startswith("not valid UTF-8"):
                message = _utf8_message(text)
            elif lineno == 1 and text.startswith("[") and message.startswith("malformed"):
                message += ("; this looks like a JSON array spread over several lines: a .jsonl "
                            "file holds one object per line (name a JSON array .json)")
            yield lineno, None, DataIssue(name, lineno, exc.field, message)
            continue
        if isinstance(value, dict):
            yield lineno, value, None
        else:
            yield lineno, None, DataIssue(name, lineno, "", _not_object(value, "jsonl"))


def _records_json_array(text: str, name: str, limit: int, bad_bytes: bool) -> Iterator[Record]:
    """Walk a top-level JSON array element by element, so each keeps its line number."""
    decoder = _Decoder()
    n = len(text)
    counted = [0, 1]  # (position, its line number), advanced monotonically

    def line_of(pos: int) -> int:
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def skip(p: int) -> int:
        while p < n and text[p] in _WS:
            p += 1
        return p

    def stop(pos: int, message: str) -> Record:
        line = line_of(pos)
        return line, None, DataIssue(name, line, "", f"{message}; the rest of this file was not read")

    pos = skip(skip(0) + 1)  # just after "["
    closed = False
    if pos < n and text[pos] == "]":
        pos, closed = pos + 1, True
    while not closed and pos < n:
        decoder.bad = False
        try:
            value, end = decoder.json.raw_decode(text, pos)
            too_deep = _too_deep(text, limit, pos, end)
        except json.JSONDecodeError as exc:
            yield stop(max(exc.pos, pos), f"malformed JSON: {exc.msg} (column {exc.colno})")
            return
        except RecursionError:
            value, end, too_deep = None, _value_end(text, pos), True
            if end < 0:
                yield stop(pos, _depth_message(limit))
                return
        line = line_of(pos)
        if too_deep:
            yield line, None, DataIssue(name, line, "", _depth_message(limit))
        else:
            try:
                _check_value(decoder, value, text, bad_bytes, pos, end)
            except JSONRecordError as exc:
                yield line, None, DataIssue(name, line, exc.field, exc.message)
            else:
                if isinstance(value, dict):
                    yield line, value, None
                else:
                    yield line, None, DataIssue(name, line, "", _not_object(value, "json"))
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos < n and text[pos] == "]":
            pos, closed = pos + 1, True
        elif pos < n:
            yield stop(pos, "malformed JSON: expected ',' or ']' after an array element")
            return
    if not closed:
        yield stop(pos, "malformed JSON: the array is not closed with ']'")
        return
    pos = skip(pos)
    if pos < n:
        yield stop(pos, "extra data after the closing ']' of the JSON array")


def _first_char(f) -> bytes:
    """The first byte that is not whitespace (or a byte order mark), ``b""`` if none."""
    head = f.read(3)
    if head != b"\xef\xbb\xbf":
        f.seek(0)
    while chunk := f.read(1 << 16):
        stripped = chunk.lstrip(b" \t\r\n")
        if stripped:
            return stripped[:1]
    return b""


def read_jsonl_records(source: str | Path | bytes, name: str | None = None, layout: str = "auto",
                       max_depth: int = MAX_DEPTH) -> Iterator[Record]:
    """Read the records of a JSONL (or JSON-array) file, reporting every one it cannot accept.

    Args:
        source: a file path, or the file's content as ``bytes``.
        name: the file name used in the issues (default: the path, or ``"<bytes>"``).
        layout: ``"jsonl"`` (one object per line), ``"json"`` (a JSON array, or JSON lines
            when the content does not start with ``[``) or ``"auto"`` (``.jsonl`` and
            ``.ndjson`` are JSON lines, anything else is ``"json"``). Pass it when the path
            is a temporary name that has lost the real suffix.
        max_depth: the deepest nesting accepted.

    Returns:
        An iterator of ``(line, record, issue)``: ``line`` is 1-based, ``record`` a ``dict``
        (``None`` when ``issue`` is set), ``issue`` a :class:`DataIssue` naming file, line
        and field. Every non-blank line (or array element) gives exactly one tuple, except
        after an error that stops the reading of an array, which says so.

    Raises:
        DataError: the file is missing or cannot be read; ``layout`` is unknown.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if isinstance(source, (bytes, bytearray)):
        name = name or "<bytes>"
        f = io.BytesIO(source)
    else:
        path = Path(source)
        name = name or str(path)
        if layout == "auto":
            layout = "jsonl" if path.suffix.lower() in _JSONL_SUFFIXES else "json"
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{name}: is a directory, not a data file") from None
        except OSError as exc:
            raise DataError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if layout == "auto":
        layout = "json"
    try:
        is_array = layout == "json" and _first_char(f) == b"["
        f.seek(0)
    except OSError as exc:
        f.close()
        raise DataError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if is_array:
        with f:
            data = f.read()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        text, bad_bytes = _decode_line(data)
        return _records_json_array(text, name, max_depth, bad_bytes)
    return _closing(f, _records_jsonl(f, name, max_depth))


def _closing(f, records: Iterator[Record]) -> Iterator[Record]:
    with f:
        yield from records
