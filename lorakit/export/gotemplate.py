r"""A renderer for the subset of Go's ``text/template`` that Ollama chat templates use.

``lorakit export ollama`` writes a Modelfile ``TEMPLATE`` in Go template syntax and checks,
before anything is written, that it renders the same prompt as the tokenizer's Jinja chat
template. Python has no Go template engine, so this module renders the subset the templates
need, with Go's semantics (https://pkg.go.dev/text/template):

* text and ``{{ pipeline }}`` actions; ``{{-`` / ``-}}`` trim all white space (space, tab,
  newline, carriage return) before / after the action; ``{{/* comments */}}``;
* ``{{ range PIPELINE }} ... {{ else }} ... {{ end }}`` (dot is the element), also with
  ``$i, $m :=`` / ``$m :=`` declarations;
* ``{{ if }} / {{ else if }} / {{ else }} / {{ end }}`` with Go truthiness (false, 0, "", nil
  and empty collections are false);
* operands: ``.`` ``.Field`` ``$.Field`` ``$var`` ``$var.Field``, string literals (``"..."``
  with Go escapes, and raw ```...```), integers, ``true``/``false``; functions ``eq`` (first
  argument against each of the rest), ``ne``, ``and``, ``or``, ``not``, ``len``, ``slice``, and
  parenthesised calls.

Anything else raises :class:`GoTemplateError`. ``tests/export/test_ollama.py`` checks the
renderer against the real Go ``text/template`` when a ``go`` toolchain is installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


class GoTemplateError(ValueError):
    """The template uses syntax outside the supported subset, or is malformed."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<lp>\()|(?P<rp>\))'
                    r'|(?P<word>[^\s()]+))')
_WS = " \t\r\n"


# ---------------------------------------------------------------------- parse tree
@dataclass
class _Text:
    text: str


@dataclass
class _Output:
    expr: list


@dataclass
class _If:
    branches: list = field(default_factory=list)  # [(expr or None for else, [nodes])]


@dataclass
class _Range:
    expr: list
    names: list
    body: list = field(default_factory=list)
    else_body: list = field(default_factory=list)


def _tokenize(src: str) -> list:
    tokens, pos = [], 0
    while pos < len(src):
        if src[pos:].strip() == "":
            break
        m = _TOKEN.match(src, pos)
        if not m:
            raise GoTemplateError(f"cannot parse {src[pos:]!r}")
        pos = m.end()
        if m.group("str"):
            tokens.append(("lit", _unquote(m.group("str"))))
        elif m.group("raw"):
            tokens.append(("lit", m.group("raw")[1:-1]))
        elif m.group("lp"):
            tokens.append(("(", None))
        elif m.group("rp"):
            tokens.append((")", None))
        else:
            tokens.append(("word", m.group("word")))
    return tokens


def _unquote(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'"}
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]
            if nxt not in escapes:
                raise GoTemplateError(f"unsupported escape \\{nxt} in {text}")
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_expr(tokens: list) -> list:
    """A command: ``[callee-or-operand, args...]``; parenthesised groups become sub-lists."""
    out, stack = [], []
    for kind, value in tokens:
        if kind == "(":
            stack.append(out)
            out = []
        elif kind == ")":
            if not stack:
                raise GoTemplateError("unbalanced ')'")
            inner, out = out, stack.pop()
            out.append(("group", inner))
        elif kind == "lit":
            out.append(("lit", value))
        else:
            out.append(("word", value))
    if stack:
        raise GoTemplateError("unbalanced '('")
    if any(t == ("word", "|") for t in out):
        raise GoTemplateError("pipelines with '|' are not supported")
    return out


def parse(template: str) -> list:
    """Parse ``template`` into nodes.

    Raises:
        GoTemplateError: unsupported or malformed syntax.
    """
    pieces: list = []  # ("text", str) | ("action", str)
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(_WS)
        pieces.append(["text", text])
        pieces.append(["action", m.group(2).strip(), bool(m.group(3))])
        pos = m.end()
    pieces.append(["text", template[pos:]])
    for i, piece in enumerate(pieces):  # `-}}` trims the white space that follows
        if piece[0] == "action" and piece[2] and i + 1 < len(pieces):
            pieces[i + 1][1] = pieces[i + 1][1].lstrip(_WS)

    root: list = []
    stack: list = [("root", root, None)]
    for piece in pieces:
        kind, body = piece[0], piece[1]
        current = stack[-1][1]
        if kind == "text":
            if body:
                current.append(_Text(body))
            continue
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise GoTemplateError(f"unterminated comment {{{{{body}}}}}")
            continue
        word, _, rest = body.partition(" ")
        rest = rest.strip()
        if word == "if":
            node = _If([(_parse_expr(_tokenize(rest)), [])])
            current.append(node)
            stack.append(("if", node.branches[0][1], node))
        elif word == "range":
            names = []
            m = re.match(r"(\$\w*)\s*(?:,\s*(\$\w*))?\s*:=\s*(.*)", rest, re.S)
            if m:
                names = [n for n in (m.group(1), m.group(2)) if n]
                rest = m.group(3)
            node = _Range(_parse_expr(_tokenize(rest)), names)
            current.append(node)
            stack.append(("range", node.body, node))
        elif word == "else":
            top_kind, _, node = stack.pop()
            if top_kind == "if":
                if rest.startswith("if "):
                    branch = (_parse_expr(_tokenize(rest[3:])), [])
                else:
                    branch = (None, [])
                node.branches.append(branch)
                stack.append(("if", branch[1], node))
            elif top_kind == "range":
                stack.append(("range-else", node.else_body, node))
            else:
                raise GoTemplateError("{{ else }} outside if/range")
        elif word == "end":
            if len(stack) == 1:
                raise GoTemplateError("{{ end }} without if/range")
            stack.pop()
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{{{{ {word} }}}} is not supported by this renderer")
        else:
            if ":=" in body or re.match(r"\$\w*\s*=", body):
                raise GoTemplateError(f"variable assignment {{{{ {body} }}}} is not supported")
            current.append(_Output(_parse_expr(_tokenize(body))))
    if len(stack) != 1:
        raise GoTemplateError(f"missing {{{{ end }}}} for {stack[-1][0]}")
    return root


# ---------------------------------------------------------------------- evaluation
def _truth(value) -> bool:
    if value is None or value is False:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


def _field(value, name: str):
    if isinstance(value, dict):
        if name not in value:
            return None  # a map lookup of a missing key gives the zero value
        return value[name]
    try:
        return getattr(value, name)
    except AttributeError:
        raise GoTemplateError(f"can't evaluate field {name}") from None


def _resolve(word: str, dot, scope: dict):
    if word == ".":
        return dot
    if word in ("true", "false"):
        return word == "true"
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    if word.startswith("$"):
        name, _, path = word.partition(".")
        if name not in scope:
            raise GoTemplateError(f"undefined variable {name}")
        value = scope[name]
    elif word.startswith("."):
        value, path = dot, word[1:]
    else:
        raise GoTemplateError(f"function {word!r} is not supported")
    for part in filter(None, path.split(".")):
        value = _field(value, part)
    return value


def _go_str(value) -> str:
    if value is None:
        return "<no value>"
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


_FUNCS = {"eq", "ne", "and", "or", "not", "len", "slice"}


def _eval(expr: list, dot, scope: dict):
    if not expr:
        raise GoTemplateError("empty command")
    kind, head = expr[0]
    if kind == "word" and head in _FUNCS:
        args = expr[1:]
        if head == "and":  # short-circuits, returns the deciding operand
            value = None
            for arg in args:
                value = _eval([arg], dot, scope)
                if not _truth(value):
                    return value
            return value
        if head == "or":
            value = None
            for arg in args:
                value = _eval([arg], dot, scope)
                if _truth(value):
                    return value
            return value
        values = [_eval([a], dot, scope) for a in args]
        if head == "not":
            return not _truth(values[0])
        if head == "len":
            return len(values[0])
        if head == "slice":
            seq, *bounds = values
            return seq[bounds[0]:bounds[1]] if len(bounds) == 2 else seq[bounds[0]:] if bounds else seq
        if head == "eq":
            return any(values[0] == v for v in values[1:])
        if head == "ne":
            return values[0] != values[1]
    if len(expr) > 1:
        raise GoTemplateError(f"cannot call {head!r} with arguments")
    if kind == "lit":
        return head
    if kind == "group":
        return _eval(head, dot, scope)
    return _resolve(head, dot, scope)


def _render(nodes: list, dot, scope: dict, out: list) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Output):
            out.append(_go_str(_eval(node.expr, dot, scope)))
        elif isinstance(node, _If):
            for cond, body in node.branches:
                if cond is None or _truth(_eval(cond, dot, scope)):
                    _render(body, dot, scope, out)
                    break
        elif isinstance(node, _Range):
            seq = _eval(node.expr, dot, scope)
            items = list(seq.items()) if isinstance(seq, dict) else list(enumerate(seq or []))
            if not items:
                _render(node.else_body, dot, scope, out)
            for index, item in items:
                inner = dict(scope)
                if len(node.names) == 2:
                    inner[node.names[0]], inner[node.names[1]] = index, item
                elif len(node.names) == 1:
                    inner[node.names[0]] = item
                _render(node.body, item, inner, out)


def render(template: str, data: dict) -> str:
    """Render ``template`` with ``data`` as dot (and ``$``).

    Raises:
        GoTemplateError: unsupported syntax, or a field that cannot be evaluated.
    """
    out: list = []
    _render(parse(template), data, {"$": data}, out)
    return "".join(out)
