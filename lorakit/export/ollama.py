r'''``lorakit export ollama``: a GGUF plus a Modelfile that ``ollama create`` reads.

The folder holds ``model.gguf`` (the merged model, written and checked by ``export gguf``) and
``Modelfile``::

    FROM ./model.gguf
    TEMPLATE """<the chat template in Go template syntax>"""
    SYSTEM """<the template's default system prompt, when it has one>"""
    PARAMETER stop "<end-of-turn token>"
    ...

Ollama formats chats with Go's ``text/template``, not Jinja, so the tokenizer's chat template
is translated: its family is recognised by its markers, and that family's template is written
out (the same per-role layout Ollama's own library uses):

| family | markers | default system / BOS |
| --- | --- | --- |
| ChatML (SmolLM2, Qwen2/2.5) | ``<|im_start|>`` ``<|im_end|>`` | read from the template |
| Llama-3 | ``<|start_header_id|>`` ``<|eot_id|>`` | BOS ``<|begin_of_text|>`` |
| Mistral | ``[INST]`` ``[/INST]`` | BOS; no system role |
| Phi-3 | ``<|user|>`` ``<|assistant|>`` ``<|end|>`` | |
| Gemma | ``<start_of_turn>`` ``<end_of_turn>`` | BOS; assistant is ``model`` |

Ollama passes the chat as ``.Messages`` (``.Role``, ``.Content``) and, when the first message
is not a system message, puts the Modelfile's ``SYSTEM`` in front as one; the BOS token is
added by the GGUF tokenizer when its ``tokenizer.ggml.add_bos_token`` is true, so the template
writes it only when that flag is false. Before anything is written the translation is
checked: for sample conversations (one turn, several turns, with and without a system
message) the Go template, rendered as Ollama renders it (:mod:`lorakit.export.gotemplate`),
must give exactly the text of the tokenizer's ``apply_chat_template(...,
add_generation_prompt=True)``. An unknown template, or a mismatch (e.g. Llama-3.1's date
lines in every system block), is an :class:`ExportError` showing the first difference.
'''

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import ExportError

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"


@dataclass(frozen=True)
class Family:
    name: str
    markers: tuple[str, ...]  # all must occur in the Jinja template
    template: str  # Go template of the messages and the generation prompt (no BOS)
    stops: tuple[str, ...]
    system_role: bool = True  # whether the family's chats have system messages


FAMILIES = [
    Family("chatml", ("<|im_start|>", "<|im_end|>"),
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end -}}\n"
           "<|im_start|>assistant\n",
           ("<|im_start|>", "<|im_end|>")),
    Family("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
           "{{ .Content }}<|eot_id|>{{ end -}}\n<|start_header_id|>assistant<|end_header_id|>\n\n",
           ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Family("phi3", ("<|user|>", "<|assistant|>", "<|end|>"),
           "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end -}}\n"
           "<|assistant|>\n",
           ("<|end|>", "<|user|>", "<|assistant|>")),
    Family("gemma", ("<start_of_turn>", "<end_of_turn>"),
           "{{- range .Messages }}<start_of_turn>"
           "{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
           "{{ .Content }}<end_of_turn>\n{{ end -}}\n<start_of_turn>model\n",
           ("<start_of_turn>", "<end_of_turn>"), system_role=False),
    Family("mistral", ("[INST]", "[/INST]"),
           "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
           "{{ else if eq .Role \"assistant\" }}{{ .Content }}{{ $.EOS }}{{ end }}{{ end }}",
           ("[INST]", "[/INST]"), system_role=False),
]

# conversations the translation is checked on; those with a system message are skipped for
# a template that refuses system messages
SAMPLE_CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Name a prime number."},
     {"role": "assistant", "content": "7 is prime."},
     {"role": "user", "content": "And an even one?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Capital of France?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!\nHow can I help?"},
     {"role": "user", "content": "Tell me a joke about {{ braces }} and \"quotes\"."}],
]


@dataclass
class OllamaTemplate:
    """The Modelfile parts for one tokenizer."""

    family: str
    template: str
    system: str | None
    stops: list[str]
    checked: int  # sample conversations that rendered identically

    def modelfile(self, gguf_name: str = GGUF_NAME, header: str | None = None) -> str:
        """The Modelfile text (``FROM ./<gguf_name>``)."""
        for what, text in (("template", self.template), ("system prompt", self.system or "")):
            if '"""' in text:
                raise ExportError(f'the chat {what} contains """, which a Modelfile cannot quote')
        lines = [f"# {line}" for line in (header or "").splitlines()]
        lines += [f"FROM ./{gguf_name}", f'TEMPLATE """{self.template}"""']
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER stop {_quote(stop)}" for stop in self.stops]
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------- translation
def detect_family(chat_template: str) -> Family:
    """The family whose markers all occur in ``chat_template``.

    Raises:
        ExportError: none does (the message lists the supported families).
    """
    for family in FAMILIES:
        if all(marker in chat_template for marker in family.markers):
            return family
    names = ", ".join(f"{f.name} ({' '.join(f.markers)})" for f in FAMILIES)
    raise ExportError(f"cannot translate this chat template to Ollama's template syntax: it "
                      f"matches no supported family by its markers; supported: {names}. Write "
                      f"the Modelfile's TEMPLATE by hand (the GGUF is still usable)")


def _hf_render(tokenizer, messages) -> str | None:
    """``apply_chat_template`` text, or None when the template refuses the conversation."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja raise_exception / TemplateError: not this chat
        return None


def _default_system(tokenizer) -> str | None:
    """The system prompt the template inserts when the chat has none, found by rendering a
    chat with and without a probe system message."""
    probe_user = [{"role": "user", "content": "PROBE-USER"}]
    with_system = _hf_render(tokenizer, [{"role": "system", "content": "PROBE-SYSTEM"}] + probe_user)
    without = _hf_render(tokenizer, probe_user)
    if with_system is None or without is None or "PROBE-SYSTEM" not in with_system:
        return None
    before, after = with_system.split("PROBE-SYSTEM", 1)
    if without.startswith(before) and without.endswith(after) and \
            len(without) > len(before) + len(after):
        return without[len(before):len(without) - len(after)]
    return None


def ollama_render(template: str, messages: list[dict], system: str | None,
                  eos: str | None = None) -> str:
    """The prompt Ollama builds from ``template`` for a chat: the Modelfile's ``SYSTEM`` goes
    in front as a system message when the chat does not start with one."""
    from lorakit.export.gotemplate import render

    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    systems = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": systems, "EOS": eos or ""}
    return render(template, data)


def translate_chat_template(tokenizer, *, gguf_adds_bos: bool) -> OllamaTemplate:
    """Translate ``tokenizer.chat_template`` into Modelfile parts and check them.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        gguf_adds_bos: whether the GGUF's tokenizer adds the BOS token itself.

    Raises:
        ExportError: no chat template, an unknown family, or a translation that renders a
            sample conversation differently from ``apply_chat_template`` (the message shows
            both texts from the first difference).
    """
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    if not chat_template:
        raise ExportError("the tokenizer has no chat template, so there is nothing to put in "
                          "the Modelfile's TEMPLATE; use a base with one (an -Instruct model)")
    family = detect_family(chat_template)
    eos = tokenizer.eos_token
    template = family.template.replace("{{ $.EOS }}", eos or "")
    probe = _hf_render(tokenizer, SAMPLE_CHATS[0])
    bos = tokenizer.bos_token
    # the Jinja template writes bos_token itself (Llama-3, Mistral, Gemma); SmolLM2's bos is
    # <|im_start|>, which its template writes as the start of the first turn instead
    starts_with_bos = bool(bos) and "bos_token" in chat_template and probe is not None \
        and probe.startswith(bos)
    if starts_with_bos and not gguf_adds_bos:
        template = bos + template
    system = _default_system(tokenizer) if family.system_role else None
    stops = list(family.stops)
    checked = 0
    for messages in SAMPLE_CHATS:
        want = _hf_render(tokenizer, messages)
        if want is None:
            continue
        got = ollama_render(template, messages, system)
        if gguf_adds_bos and bos:
            got = bos + got  # what the GGUF tokenizer puts in front
        if got != want and gguf_adds_bos and got == bos + want:
            raise ExportError(
                f"the GGUF's tokenizer adds a BOS token ({bos!r}, tokenizer.ggml.add_bos_token) "
                f"that this chat template does not write, so Ollama's prompts would start with "
                f"one token more than the tokenizer's; pass --force to keep it anyway")
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                      min(len(got), len(want)))
            raise ExportError(
                f"the {family.name} Ollama template does not reproduce this tokenizer's chat "
                f"template for {[m['role'] for m in messages]} (from character {at}: Ollama "
                f"{got[at:at + 80]!r}, tokenizer {want[at:at + 80]!r}); write the Modelfile's "
                f"TEMPLATE by hand, or pass --force to keep the translated one")
        checked += 1
    if not checked:
        raise ExportError("the chat template rendered none of the sample conversations")
    return OllamaTemplate(family.name, template, system, stops, checked)


# ---------------------------------------------------------------------- the command
def _gguf_adds_bos(path) -> bool:
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field is not None and field.parts[field.data[0]][0])


def export_ollama(adapter_dir, out, model: str | None = None, *, out_type: str = "f16",
                  force: bool = False, overwrite: bool = False, check: bool = True,
                  prompts: list[str] | None = None, max_new_tokens: int = 16,
                  console=None) -> dict:
    """``lorakit export ollama``: ``out/model.gguf`` (as ``export gguf``) and ``out/Modelfile``.

    Args:
        adapter_dir: the adapter folder, or None to export the ``model`` base alone.
        out: the folder to write (refused when it exists, unless ``overwrite``).
        model: the base (default: the adapter's recorded base).
        out_type, check, prompts, max_new_tokens: as ``export gguf``.
        force: keep outputs whose GGUF check or template check fails.

    Returns:
        ``{"out", "gguf", "modelfile", "family", "system", "stops", "template_checked",
        "gguf_check", "command"}``.

    Raises:
        ExportError: the output exists, the chat template cannot be translated (unless
            ``force``: then it is written with the failure noted), or the GGUF fails.
    """
    from rich.console import Console

    from lorakit.export.gguf import export_gguf
    from lorakit.export.merge import prepare_output, publish
    from lorakit.models.load import load_tokenizer

    console = console or Console(stderr=True)
    out = Path(out)
    if adapter_dir is None and not model:
        raise ExportError("pass --adapter DIR (and optionally --model) or --model alone")
    spec = model
    if spec is None:
        from lorakit.lora.io import read_adapter_folder

        spec = read_adapter_folder(adapter_dir).base_model
        if not spec:
            raise ExportError(f"{adapter_dir} does not say which base model it was trained on; "
                              f"pass --model MODEL")
    tokenizer = load_tokenizer(spec)
    try:  # fail before the (long) GGUF export; re-checked with the written file's BOS flag
        translate_chat_template(tokenizer, gguf_adds_bos=bool(getattr(tokenizer, "add_bos_token", False)))
    except ExportError:
        if not force:
            raise
    tmp = prepare_output(out, overwrite)
    tmp.mkdir()
    try:
        result = export_gguf(adapter_dir, tmp / GGUF_NAME, model, out_type=out_type, force=force,
                             check=check, prompts=prompts, max_new_tokens=max_new_tokens,
                             console=console)
        note = None
        try:
            parts = translate_chat_template(tokenizer, gguf_adds_bos=_gguf_adds_bos(tmp / GGUF_NAME))
        except ExportError as exc:
            if not force:
                raise
            note = str(exc)
            family = detect_family(tokenizer.chat_template)
            parts = OllamaTemplate(family.name, family.template, None, list(family.stops), 0)
        header = (f"written by lorakit export ollama: base {result['base']}"
                  + (f", adapter {adapter_dir}" if adapter_dir else "")
                  + f", {out_type}; chat template: {parts.family}, checked on {parts.checked} "
                  f"sample conversations" + (f"\nWARNING (--force): {note}" if note else "")
                  + f"\nnext: ollama create NAME -f {out / MODELFILE_NAME}")
        from lorakit.lora.io import atomic_write_bytes

        atomic_write_bytes(tmp / MODELFILE_NAME, parts.modelfile(GGUF_NAME, header).encode())
        publish(tmp, out)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "gguf": str(out / GGUF_NAME), "modelfile": str(out / MODELFILE_NAME),
            "family": parts.family, "system": parts.system, "stops": parts.stops,
            "template_checked": parts.checked, "template_error": note,
            "gguf_check": result.get("check"), "base": result["base"],
            "command": f"ollama create NAME -f {out / MODELFILE_NAME}"}
