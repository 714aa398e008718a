"""``lorakit export ollama``: the Modelfile's template renders what the chat template renders.

The Go templates are rendered with lorakit's Go-template subset renderer and, when a ``go``
toolchain is installed (Debian: ``apt-get install golang-go``), also with Go's own
``text/template``, which is what Ollama runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from lorakit.cli import main
from lorakit.errors import ExportError
from lorakit.export import gotemplate
from lorakit.export.ollama import FAMILIES, SAMPLE_CHATS, translate_chat_template

from export.helpers import make_adapter, save_base

# real chat templates as their tokenizer_config.json files ship them
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] "
          "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content "
          "%}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
          "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
        "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
         "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
         "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
         "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
         "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\n'}}{% endif %}")
# Qwen2.5-Instruct's template without its tools branch: ChatML with a default system prompt
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + "
        "messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are "
        "Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
        "{%- for message in messages %}{%- if (message.role == \"user\") or (message.role == "
        "\"system\" and not loop.first) or (message.role == \"assistant\") %}{{- '<|im_start|>' "
        "+ message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
# Llama-3.1 writes its knowledge-date lines into every system block: no Ollama equivalent
LLAMA31_LIKE = ("{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting "
                "Knowledge Date: December 2023\n\n' }}{% if messages[0]['role'] == 'system' %}"
                "{{ messages[0]['content'] }}{% set messages = messages[1:] %}{% endif %}"
                "{{ '<|eot_id|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                "'<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}")

EXTRA_CHATS = [
    [{"role": "user", "content": "  spaced  "[2:-2]},
     {"role": "assistant", "content": "Sure: {\"a\": 1}"},
     {"role": "user", "content": "Line one\nline two"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "x"},
     {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"},
     {"role": "assistant", "content": "w"}, {"role": "user", "content": "last"}],
]


def _tokenizer(template: str | None, bos: str, eos: str, specials: list[str]):
    """The embedded SmolLM2 tokenizer with another family's chat template and special tokens."""
    from lorakit.models.load import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    tok.add_tokens([bos, eos, *specials], special_tokens=True)
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template
    return tok


FAMILY_TOKENIZERS = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "mistral": (MISTRAL, "<s>", "</s>", ["[INST]", "[/INST]"]),
    "phi3": (PHI3, "<s>", "<|endoftext|>", ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "qwen": (QWEN, "<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
}


# ---------------------------------------------------------------------- Go's text/template
_GO_MAIN = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type job struct {
	Template string         `json:"template"`
	Data     map[string]any `json:"data"`
}

func main() {
	var jobs []job
	if err := json.NewDecoder(os.Stdin).Decode(&jobs); err != nil {
		panic(err)
	}
	out := []string{}
	for _, j := range jobs {
		t := template.Must(template.New("t").Parse(j.Template))
		var b strings.Builder
		if err := t.Execute(&b, j.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render a batch of (template, data) with Go's text/template; skip without Go."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) for the text/template reference")
    folder = tmp_path_factory.mktemp("go")
    (folder / "main.go").write_text(_GO_MAIN)
    exe = folder / "render"
    env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(exe), str(folder / "main.go")], check=True, env=env,
                   capture_output=True, timeout=600)

    def render(jobs):
        done = subprocess.run([str(exe)], input=json.dumps(
            [{"template": t, "data": d} for t, d in jobs]), capture_output=True, text=True,
            check=True, timeout=60)
        return json.loads(done.stdout)

    return render


def _data(messages, system=""):
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": system}


SYNTAX_CASES = [
    ("a  {{- .System -}}  b\n{{ .System }}", {"System": "S"}),
    ("{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}{{ if eq $i 0 }}!{{ end }} {{ end }}",
     _data(SAMPLE_CHATS[1])),
    ("{{ range .Messages }}{{ if eq .Role \"user\" \"system\" }}U{{ else if ne .Role \"x\" }}A"
     "{{ else }}?{{ end }}{{ end }}", _data(SAMPLE_CHATS[3])),
    ("{{ range .Messages }}x{{ else }}empty{{ end }}|{{ if and .System (not .Missing) }}y{{ end }}"
     "|{{ or .Missing \"dflt\" }}|{{ len .Messages }}", {"Messages": [], "System": "s"}),
    ("{{- range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}last={{ .Content }}"
     "{{ end }}{{ end }}{{/* a comment */}}\n", _data(SAMPLE_CHATS[1])),
    ("{{ \"q\\\"\\n\" }}{{ `raw\\n` }}{{ true }}", {}),
]


def test_subset_renderer_equals_go_text_template(go_render):
    """lorakit's renderer and Go's text/template agree on every family template and chat and
    on the syntax the renderer claims (trim markers, range/else, if/else if, eq with several
    arguments, and/or/not, len, slice, variables, comments, literals)."""
    jobs = list(SYNTAX_CASES)
    for family in FAMILIES:
        template = family.template.replace("{{ $.EOS }}", "</s>")
        for chat in SAMPLE_CHATS + EXTRA_CHATS:
            jobs.append((template, _data(chat, "sys")))
    want = go_render(jobs)
    got = [gotemplate.render(t, d) for t, d in jobs]
    assert got == want


def test_subset_renderer_refuses_what_it_does_not_know():
    for bad in ["{{ with .X }}{{ end }}", "{{ if .X }}", "{{ end }}", "{{ printf \"%s\" .X }}",
                "{{ $x := 1 }}", "{{ .X | print }}"]:
        with pytest.raises(gotemplate.GoTemplateError):
            gotemplate.render(bad, {"X": "x"})


# ---------------------------------------------------------------------- the translation
def _modelfile_parts(text: str) -> dict:
    """TEMPLATE, SYSTEM and the stops, read back from the Modelfile text."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    stops = [json.loads(s) for s in re.findall(r"^PARAMETER stop (.*)$", text, re.M)]
    return {"template": template, "system": system.group(1) if system else None, "stops": stops,
            "from": re.search(r"^FROM (.*)$", text, re.M).group(1)}


def _ollama_prompt(parts: dict, messages: list[dict], render) -> str:
    """What Ollama sends the model: SYSTEM in front as a system message when the chat has
    none, then the template over the messages."""
    if parts["system"] and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": parts["system"]}] + messages
    systems = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return render(parts["template"], _data(messages, systems))


def _chats_the_template_accepts(tokenizer):
    out = []
    for chat in SAMPLE_CHATS + EXTRA_CHATS:
        try:
            out.append((chat, tokenizer.apply_chat_template(chat, tokenize=False,
                                                            add_generation_prompt=True)))
        except Exception:  # noqa: BLE001 - a template that refuses system messages
            pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("adds_bos", [False, True])
def test_smollm2_modelfile_renders_the_chat_template(smol_tokenizer, adds_bos):
    """SmolLM2's real template: ChatML with a default system prompt."""
    parts = _modelfile_parts(translate_chat_template(smol_tokenizer, gguf_adds_bos=False).modelfile())
    assert parts["system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert parts["stops"] == ["<|im_start|>", "<|im_end|>"] and parts["from"] == "./model.gguf"
    chats = _chats_the_template_accepts(smol_tokenizer)
    assert len(chats) == len(SAMPLE_CHATS + EXTRA_CHATS)
    for chat, want in chats:
        assert _ollama_prompt(parts, chat, gotemplate.render) == want
    if adds_bos:  # a GGUF that adds a BOS SmolLM2's template does not write: refused
        with pytest.raises(ExportError, match="adds a BOS token"):
            translate_chat_template(smol_tokenizer, gguf_adds_bos=True)


@pytest.mark.parametrize("name", list(FAMILY_TOKENIZERS))
@pytest.mark.parametrize("adds_bos", [False, True])
def test_family_modelfile_renders_the_chat_template(name, adds_bos):
    tok = _tokenizer(*FAMILY_TOKENIZERS[name])
    template_bos = "bos_token" in FAMILY_TOKENIZERS[name][0]
    if adds_bos and not template_bos:  # Ollama's prompt would get a BOS the template lacks
        with pytest.raises(ExportError, match="adds a BOS token"):
            translate_chat_template(tok, gguf_adds_bos=True)
        return
    result = translate_chat_template(tok, gguf_adds_bos=adds_bos)
    parts = _modelfile_parts(result.modelfile())
    if template_bos and not adds_bos:  # the GGUF does not add it: the template writes it
        assert parts["template"].startswith(tok.bos_token)
    else:
        assert not parts["template"].startswith(tok.bos_token)
    if name == "qwen":
        assert result.family == "chatml"
        assert parts["system"] == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    else:
        assert result.family == name and parts["system"] is None
    chats = _chats_the_template_accepts(tok)
    assert len(chats) >= 2
    for chat, want in chats:
        prefix = tok.bos_token if (adds_bos and template_bos) else ""
        assert prefix + _ollama_prompt(parts, chat, gotemplate.render) == want
    end_of_turn = {"llama3": "<|eot_id|>", "mistral": "[INST]", "phi3": "<|end|>",
                   "gemma": "<end_of_turn>", "qwen": "<|im_end|>"}[name]
    assert end_of_turn in parts["stops"]


def test_modelfile_templates_render_the_same_in_go(smol_tokenizer, go_render):
    """The Modelfile TEMPLATE of each family, rendered by Go's text/template (what Ollama
    runs), equals the tokenizer's apply_chat_template on the sample chats."""
    cases = [(smol_tokenizer, "")]
    for name, spec in FAMILY_TOKENIZERS.items():
        tok = _tokenizer(*spec)
        cases.append((tok, ""))
    jobs, wants = [], []
    for tok, _ in cases:
        parts = _modelfile_parts(translate_chat_template(tok, gguf_adds_bos=False).modelfile())
        for chat, want in _chats_the_template_accepts(tok):
            captured = []
            _ollama_prompt(parts, chat, lambda t, d: captured.append((t, d)) or "")
            jobs.append(captured[0])
            wants.append(want)
    assert go_render(jobs) == wants


def test_unknown_or_untranslatable_templates_are_clear_errors():
    with pytest.raises(ExportError, match="matches no supported family"):
        translate_chat_template(_tokenizer("{% for m in messages %}### {{ m['role'] }}: "
                                           "{{ m['content'] }}\n{% endfor %}", "<s>", "</s>", []),
                                gguf_adds_bos=False)
    with pytest.raises(ExportError, match="llama3 Ollama template does not reproduce"):
        translate_chat_template(_tokenizer(LLAMA31_LIKE, "<|begin_of_text|>", "<|eot_id|>",
                                           ["<|start_header_id|>", "<|end_header_id|>"]),
                                gguf_adds_bos=False)
    with pytest.raises(ExportError, match="no chat template"):
        translate_chat_template(_tokenizer(None, "<s>", "</s>", []), gguf_adds_bos=False)


# ---------------------------------------------------------------------- the command
def test_export_ollama_writes_gguf_and_modelfile(tmp_path, capsys):
    """An adapter over a tiny llama base with SmolLM2's tokenizer: model.gguf + Modelfile."""
    import gguf

    base = save_base(tmp_path, "llama", tokenizer="smol")
    adapter = make_adapter(tmp_path, base, r=4)
    out = tmp_path / "ollama"
    rc = main(["export", "ollama", "--adapter", str(adapter), "--out", str(out), "--type", "f32",
               "--no-check", "--json"])  # the GGUF check itself: tests/export/test_gguf.py
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(captured.out)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    assert result["family"] == "chatml" and result["template_checked"] == len(SAMPLE_CHATS)
    assert result["gguf_check"] is None
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert "tokenizer.chat_template" in reader.fields
    text = (out / "Modelfile").read_text()
    parts = _modelfile_parts(text)
    assert parts["from"] == "./model.gguf" and "<|im_end|>" in parts["stops"]
    assert f"ollama create NAME -f {out / 'Modelfile'}" in text
    from lorakit.models.load import load_tokenizer

    tok = load_tokenizer(str(base))
    for chat, want in _chats_the_template_accepts(tok):
        assert _ollama_prompt(parts, chat, gotemplate.render) == want
    # an existing folder is refused; --overwrite replaces it
    assert main(["export", "ollama", "--adapter", str(adapter), "--out", str(out),
                 "--no-check"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "ollama", "--adapter", str(adapter), "--out", str(out), "--no-check",
                 "--overwrite", "--type", "q8_0"]) == 0
    assert (out / "Modelfile").is_file() and not list(tmp_path.glob(".ollama.tmp*"))


def test_export_ollama_refuses_an_untranslatable_template_before_writing(tmp_path, capsys):
    base = save_base(tmp_path, "llama", tokenizer="smol")
    from lorakit.models.load import load_tokenizer

    tok = load_tokenizer(str(base))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(base)
    out = tmp_path / "o"
    assert main(["export", "ollama", "--model", str(base), "--out", str(out)]) == 2
    assert "matches no supported family" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o.tmp*"))
