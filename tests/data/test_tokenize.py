"""Label masking: the supervised tokens decode to exactly the assistant answers + end-of-turn.

The SmolLM2 tokenizer is reused with other chat templates assigned (ChatML without a default
system prompt, Llama-3 headers, Mistral [INST], Mistral with the system prompt folded into
the last user turn) to cover templates of other shapes.
"""

import copy

import pytest
import torch

from lorakit.data.formats import Example, parse_record
from lorakit.data.tokenize import (IGNORE_INDEX, collate, end_of_turn, pad_token_id, render,
                                   supervised_segments, tokenize_example, tokenize_examples,
                                   tokenize_preference)
from lorakit.errors import ConfigError

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
           "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
           "{{ '<s>' }}{% for m in msgs %}{% if m['role'] == 'user' %}"
           "{{ '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}")
# Mistral v0.3 style: the system prompt goes into the *last* user turn, after earlier answers
MISTRAL_SYSTEM_LAST = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{{ '<s>' }}{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + (sys if loop.index0 == msgs|length - 2 else '') + m['content'] + '[/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MISTRAL_SPECIALS = ["<s>", "</s>", "[INST]", "[/INST]"]

# name: (template or None for the tokenizer's own, tokens registered as special, end of turn)
TEMPLATES = {
    "smollm2": (None, [], "<|im_end|>"),
    "chatml": (CHATML, [], "<|im_end|>"),
    "llama3": (LLAMA3, LLAMA3_SPECIALS, "<|eot_id|>"),
    "mistral": (MISTRAL, MISTRAL_SPECIALS, "</s>"),
    "mistral_system_last": (MISTRAL_SYSTEM_LAST, MISTRAL_SPECIALS, "</s>"),
}

SYSTEM = {"role": "system", "content": "You answer in one word."}
# the first answer ("4") also occurs in the first question: it must be found after it
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2? Say 4 or 5."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris, of course."},
]
CONVERSATIONS = {
    "single": MULTI_TURN[1:3],
    "system": [SYSTEM] + MULTI_TURN[3:],
    "multi_turn": MULTI_TURN,
    "multi_turn_no_system": MULTI_TURN[1:],
}

_TOKENIZERS = {}


def _tokenizer(base, name):
    if name not in _TOKENIZERS:
        template, specials, _ = TEMPLATES[name]
        tok = copy.deepcopy(base)
        if template is not None:
            tok.chat_template = template
        if specials:
            tok.add_tokens(specials, special_tokens=True)
        _TOKENIZERS[name] = tok
    return _TOKENIZERS[name]


def _supervised_runs(item, tok):
    return [text for text, supervised in supervised_segments(item, tok) if supervised]


@pytest.mark.slow
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_supervised_tokens_are_answers_plus_end_of_turn(smol_tokenizer, template, conversation):
    tok = _tokenizer(smol_tokenizer, template)
    messages = CONVERSATIONS[conversation]
    eot = TEMPLATES[template][2]
    assert end_of_turn(tok) == eot
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    example = Example("chat", messages=messages)

    item = tokenize_example(example, tok)
    assert len(item["input_ids"]) == len(item["labels"])
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(item["labels"], item["input_ids"]))
    runs = [r.strip() for r in _supervised_runs(item, tok)]  # a leading space may join the answer
    assert runs == [a + eot for a in answers]

    last = tokenize_example(example, tok, train_on="last_turn")
    assert [r.strip() for r in _supervised_runs(last, tok)] == [answers[-1] + eot]

    everything = tokenize_example(example, tok, train_on="everything")
    assert everything["labels"] == everything["input_ids"]
    assert tok.decode(everything["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)


@pytest.mark.slow
def test_unregistered_markers_still_cover_answer_and_end_of_turn(smol_tokenizer):
    """Llama-3 markers that are several SmolLM2 tokens: the offsets still find the spans;
    only a token that straddles the end of the marker can add a character or two."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = LLAMA3
    item = tokenize_example(Example("chat", messages=MULTI_TURN), tok)
    runs = _supervised_runs(item, tok)
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run.startswith(answer + "<|eot_id|>") and len(run) <= len(answer + "<|eot_id|>") + 2
    assert runs[-1] == answers[-1] + "<|eot_id|>"


@pytest.mark.slow
def test_prompt_completion_and_alpaca_use_the_chat_template(smol_tokenizer):
    for record in ({"prompt": "Capital of Peru?", "completion": "Lima."},
                   {"instruction": "Capital of", "input": "Peru", "output": "Lima."}):
        item = tokenize_example(parse_record(record), smol_tokenizer)
        assert _supervised_runs(item, smol_tokenizer) == ["Lima.<|im_end|>"]
        assert item["input_ids"][-2:] == [smol_tokenizer.eos_token_id, 198]  # <|im_end|> "\n"


@pytest.mark.slow
def test_no_chat_template_falls_back_to_concatenation(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    item = tokenize_example(parse_record({"prompt": "Q: 2+2?\nA:", "completion": " 4"}), tok)
    assert tok.decode(item["input_ids"]) == "Q: 2+2?\nA: 4" + tok.eos_token
    assert _supervised_runs(item, tok) == [" 4" + tok.eos_token]
    assert item["labels"][-1] == tok.eos_token_id


@pytest.mark.slow
def test_text_examples_learn_everything_and_end_with_eos(smol_tokenizer):
    item = tokenize_example(Example("text", text="Domain text about LoRA."), smol_tokenizer)
    assert item["labels"] == item["input_ids"]
    assert item["input_ids"][-1] == smol_tokenizer.eos_token_id


@pytest.mark.slow
def test_preference_and_truncation(smol_tokenizer):
    ex = parse_record({"prompt": "Pick a colour", "chosen": "Blue.", "rejected": "Seven."})
    out = tokenize_preference(ex, smol_tokenizer)
    assert _supervised_runs({"input_ids": out["chosen_input_ids"], "labels": out["chosen_labels"]},
                            smol_tokenizer) == ["Blue.<|im_end|>"]
    assert _supervised_runs({"input_ids": out["rejected_input_ids"], "labels": out["rejected_labels"]},
                            smol_tokenizer) == ["Seven.<|im_end|>"]
    # a preference example used for SFT learns the chosen answer
    assert _supervised_runs(tokenize_example(ex, smol_tokenizer), smol_tokenizer) == ["Blue.<|im_end|>"]

    items = tokenize_examples([ex, ex], smol_tokenizer, max_length=7)
    assert all(len(it["input_ids"]) == 7 == len(it["labels"]) for it in items)


@pytest.mark.slow
def test_render_reports_spans_in_characters(smol_tokenizer):
    text, spans, append_eos = render(Example("chat", messages=MULTI_TURN[1:3]), smol_tokenizer)
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>"]
    assert not append_eos
    with pytest.raises(ConfigError, match="did you mean 'last_turn'"):
        render(Example("chat", messages=MULTI_TURN[1:3]), smol_tokenizer, train_on="last_trun")


@pytest.mark.slow
def test_padding_with_eos_never_masks_the_eos_label(smol_tokenizer):
    # SmolLM2 pads with its EOS (<|im_end|>): padding must not hide the answers' final EOS
    pad = pad_token_id(smol_tokenizer)
    assert pad == smol_tokenizer.eos_token_id
    examples = [parse_record({"prompt": "Hi", "completion": "Hello there, friend."}),
                parse_record({"prompt": "A much longer question " * 5, "completion": "Ok."})]
    items = tokenize_examples(examples, smol_tokenizer, train_on="last_turn")
    batch = collate(items, pad)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["attention_mask"][row].sum() == n
        assert batch["labels"][row, :n].tolist() == item["labels"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        # the supervised EOS (last supervised label) is kept
        supervised = [lab for lab in item["labels"] if lab != IGNORE_INDEX]
        assert supervised[-1] == pad
        assert (batch["labels"][row] == pad).sum() == item["labels"].count(pad)


def test_collate_with_pad_equal_to_eos_matches_unpadded_loss():
    """Tiny Llama, pad id == EOS id == 2: the padded batch loss equals the token-weighted
    mean of the unpadded per-example losses, and every EOS label survives."""
    from tiny_models import make_tiny_model

    eos = 2
    items = [{"input_ids": [1, 40, 41, 42, 50, 51, eos], "labels": [-100, -100, -100, -100, 50, 51, eos]},
             {"input_ids": [1, 60, 61, eos], "labels": [-100, -100, 61, eos]}]
    batch = collate(items, pad_id=eos, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert (batch["labels"] == eos).sum() == 2
    model = make_tiny_model("llama")
    with torch.no_grad():
        padded = model(**batch).loss
        total = count = 0
        for it in items:
            loss = model(torch.tensor([it["input_ids"]]), labels=torch.tensor([it["labels"]])).loss
            n = sum(lab != IGNORE_INDEX for lab in it["labels"][1:])
            total, count = total + loss * n, count + n
    torch.testing.assert_close(padded, total / count, rtol=0, atol=1e-5)


class _SlowTokenizer:
    """A tokenizer without a Rust backend (no offset mapping): labels come from encoding
    the supervised spans piece by piece."""

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._fast, name)

    def __call__(self, *args, **kwargs):
        return self._fast(*args, **kwargs)


@pytest.mark.slow
def test_tokenizer_without_offsets_labels_the_same_spans(smol_tokenizer):
    slow = _SlowTokenizer(smol_tokenizer)
    item = tokenize_example(Example("chat", messages=MULTI_TURN), slow)
    assert _supervised_runs(item, smol_tokenizer) == ["4<|im_end|>", "Paris, of course.<|im_end|>"]
