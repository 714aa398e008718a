"""The prompt baseline: the base model with K training examples placed before each question.

``lorakit eval --few-shot K`` (``eval.few_shot`` in a run config) adds the row ``base-<K>shot``
so an adapter is compared with what a few examples in the prompt already achieve, not only
with the zero-shot base.

* **Where the examples come from.** A training file (``--few-shot-data``, default the
  ``data.train`` recorded in the adapter's run folder). Any training format lorakit reads;
  the last assistant turn is the answer, the user turns before it the question (a shot's own
  system turn is dropped: the question's system turn, if any, opens the prompt).
* **Never an eval example.** A training example whose normalised prompt text
  (:func:`lorakit.eval.metrics.normalize_text`: NFKC, case-folded, punctuation dropped,
  whitespace collapsed) equals the prompt of any eval example is removed before selection,
  and so is a second copy of the same prompt within the training file.
* **Selection** (``--few-shot-select``): ``first`` — the first K of the file, the same for
  every question; ``random`` — K drawn per question with a seeded generator (``--seed``);
  ``similar`` — per question the K training prompts nearest by TF-IDF cosine similarity over
  word unigrams and bigrams (lower-cased Unicode words, smoothed idf
  ``ln((1 + n) / (1 + df)) + 1``, as scikit-learn's default); ties go to the earlier example.
  The nearest is placed last, right before the question.
* **Rendering.** With a chat template the shots are earlier chat turns
  (``[system], user, assistant, ..., user``) rendered by the one prompt renderer
  (:func:`lorakit.data.tokenize.prompt_text`), so the ids are exactly
  ``apply_chat_template(messages, add_generation_prompt=True)``. Without a template the pairs
  are prefixed as training renders plain prompt/completion text: prompt, answer and EOS, one
  pair after the other, then the question.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorakit.errors import ConfigError, DataError

SELECTS = ("first", "random", "similar")
DEFAULT_K = 3  # eval.few_shot when data.train is known


def row_name(k: int) -> str:
    """The models[...] key of the K-shot row: ``base-3shot``."""
    return f"base-{k}shot"


@dataclass
class Shot:
    """One training example usable as a demonstration: its question turns and answer."""

    turns: list[dict]  # user (and earlier user/assistant) turns, no system turn
    answer: str
    source: tuple[str, int]

    @property
    def prompt(self) -> str:
        return self.turns[-1]["content"]

    def messages(self) -> list[dict]:
        return [dict(m) for m in self.turns] + [{"role": "assistant", "content": self.answer}]


def prompt_key(text: str) -> str:
    """The normalised prompt text two examples are compared by."""
    from lorakit.eval.metrics import normalize_text

    return normalize_text(text)


def load_shots(source: str | Path | Sequence, *, exclude: Sequence[str] = ()) -> tuple[list[Shot], int]:
    """Demonstrations from a training file (or a list of records / Examples).

    Args:
        source: a JSONL/JSON training file, a list of records, or of ``Example``.
        exclude: prompt texts (the eval questions) no shot may have, compared normalised.

    Returns:
        ``(shots, excluded)``: the usable shots in file order, and how many were dropped
        because their prompt is an eval question (or repeats an earlier shot's prompt).

    Raises:
        DataError: the file is missing or holds no usable example.
    """
    from lorakit.data.formats import Example, load_examples

    if isinstance(source, (str, Path)):
        if not Path(source).is_file():
            raise DataError(f"few-shot data file {source} does not exist")
        examples = load_examples(source).examples
        name = str(source)
    else:
        items = list(source)
        examples = items if items and isinstance(items[0], Example) else load_examples(items).examples
        name = "<memory>"
    banned = {prompt_key(p) for p in exclude}
    seen: set[str] = set()
    shots, excluded = [], 0
    for ex in examples:
        if ex.kind != "chat":
            continue
        turns = [m for m in ex.prompt_messages() if m["role"] != "system"]
        answer = ex.answer_text()
        if not turns or turns[-1]["role"] != "user" or not answer.strip():
            continue
        key = prompt_key(turns[-1]["content"])
        if key in banned or key in seen:
            excluded += 1
            continue
        seen.add(key)
        shots.append(Shot(turns, answer, ex.source))
    if not shots:
        raise DataError(f"{name}: no training example usable as a few-shot demonstration "
                        f"(chat or prompt/completion records whose prompt is not an eval question)")
    return shots, excluded


# ---------------------------------------------------------------------- similarity
def _terms(text: str) -> list[str]:
    from lorakit.eval.metrics import words

    w = words(text)
    return w + [f"{a} {b}" for a, b in zip(w, w[1:])]


class TfidfIndex:
    """TF-IDF vectors (word unigrams + bigrams) of ``documents``, kept sparse: for each term the
    documents holding it and their weights (an inverted index in flat arrays). The idf is fitted
    on ``documents`` (smoothed: ``ln((1+n)/(1+df)) + 1``) and every vector is L2-normalised, so
    a row of :meth:`similarity` is a query's cosine similarity with each document; a query's
    terms unseen in the documents carry no weight. Memory grows with the terms the documents
    hold, not with documents x vocabulary: selecting for 2,000 questions among 20,000 SQL
    prompts peaked at +118 MiB against +12.9 GiB dense (bench/bench_fewshot.py)."""

    def __init__(self, documents: Sequence[str]):
        self.vocab: dict[str, int] = {}
        term_ids: list[int] = []
        counts: list[int] = []
        lengths: list[int] = []
        for text in documents:
            terms = Counter(_terms(text))
            term_ids += [self.vocab.setdefault(t, len(self.vocab)) for t in terms]
            counts += terms.values()
            lengths.append(len(terms))
        self.size = n = len(lengths)
        terms_ = np.array(term_ids, dtype=np.int64)
        docs = np.repeat(np.arange(n, dtype=np.int64), lengths)
        self.idf = np.log((1 + n) / (1 + np.bincount(terms_, minlength=len(self.vocab)))) + 1
        weights = np.array(counts, dtype=np.float64) * self.idf[terms_]
        norms = np.sqrt(np.bincount(docs, weights * weights, minlength=n))
        weights /= np.where(norms == 0, 1, norms)[docs]
        order = np.argsort(terms_, kind="stable")  # grouped by term, documents ascending
        self.docs, self.weights = docs[order], weights[order]
        self.start = np.concatenate([[0], np.cumsum(np.bincount(terms_, minlength=len(self.vocab)))])

    def similarity(self, queries: Sequence[str]) -> np.ndarray:
        """Cosine similarities, ``(len(queries), len(documents))``."""
        out = np.zeros((len(queries), self.size))
        for i, query in enumerate(queries):
            known = {self.vocab[t]: c for t, c in Counter(_terms(query)).items() if t in self.vocab}
            q = {j: c * self.idf[j] for j, c in known.items()}
            norm = math.sqrt(sum(v * v for v in q.values())) or 1.0
            row = out[i]
            for j, v in q.items():
                lo, hi = self.start[j], self.start[j + 1]
                row[self.docs[lo:hi]] += (v / norm) * self.weights[lo:hi]  # distinct documents
        return out


def tfidf_similarity(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """Cosine similarity of TF-IDF vectors (word unigrams + bigrams), ``(len(queries),
    len(documents))`` (:class:`TfidfIndex`)."""
    return TfidfIndex(documents).similarity(queries)


def select_shots(shots: Sequence[Shot], questions: Sequence[str], k: int, select: str = "similar",
                 seed: int = 0) -> list[list[int]]:
    """For each question, the indices (into ``shots``) of its K demonstrations, in prompt order.

    Raises:
        ConfigError: unknown ``select`` or ``k < 1``.
    """
    if select not in SELECTS:
        raise ConfigError(f"--few-shot-select must be one of {', '.join(SELECTS)}, got {select!r}")
    if k < 1:
        raise ConfigError(f"--few-shot must be at least 1 to add a few-shot row, got {k}")
    k = min(k, len(shots))
    if select == "first":
        return [list(range(k)) for _ in questions]
    if select == "random":
        rng = np.random.default_rng(seed)
        return [sorted(int(i) for i in rng.choice(len(shots), size=k, replace=False))
                for _ in questions]
    index = TfidfIndex([s.prompt for s in shots])
    out = []
    for start in range(0, len(questions), 256):  # 256 rows of len(shots) similarities at a time
        for row in index.similarity(questions[start:start + 256]):
            # ties: the earlier example (rounded first: equal texts' similarities can differ
            # in the last bit, with the summation order)
            nearest = np.argsort(-np.round(row, 12), kind="stable")[:k]
            out.append([int(i) for i in nearest[::-1]])  # the nearest last, next to the question
    return out


# ---------------------------------------------------------------------- rendering
def fewshot_messages(question: Sequence[dict], shots: Sequence[Shot]) -> list[dict]:
    """``[system] + shot turns + question``: the K-shot prompt as one chat conversation."""
    head = [dict(m) for m in question if m["role"] == "system"]
    body = [dict(m) for m in question if m["role"] != "system"]
    turns = [m for shot in shots for m in shot.messages()]
    return head + turns + body


def fewshot_prompt(tokenizer, messages: Sequence[dict]) -> Any:
    """What :func:`lorakit.eval.generate.generate_batch` takes for this prompt: the message
    list when the tokenizer has a chat template (rendered there by ``prompt_text``), else the
    plain text training would see: each turn's content, an EOS after every answer, concatenated
    (``lorakit.data.tokenize`` renders plain prompt/completion data the same way)."""
    from lorakit.data.tokenize import has_chat_template

    if has_chat_template(tokenizer):
        return [dict(m) for m in messages]
    eos = getattr(tokenizer, "eos_token", None) or ""
    return "".join(m["content"] + (eos if m["role"] == "assistant" else "") for m in messages)


def recorded_training_file(adapter_dir: str | Path | None) -> Path | None:
    """The ``data.train`` of the run an adapter came from (its manifest's ``run`` folder, or
    the folder above ``runs/NAME/adapter``, holding ``config.yaml``), if that file exists."""
    import yaml

    from lorakit.errors import AdapterError
    from lorakit.lora.io import read_manifest

    if not adapter_dir:
        return None
    folder = Path(adapter_dir)
    runs = [folder.parent]
    try:
        run = read_manifest(folder).get("run")
    except AdapterError:
        run = None
    if run:
        runs.insert(0, Path(run))
    for run_dir in runs:
        config = run_dir / "config.yaml"
        if not config.is_file():
            continue
        try:
            train = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("train")
        except (yaml.YAMLError, AttributeError):
            continue
        if not train:
            continue
        for candidate in (Path(train), run_dir / train):
            if candidate.is_file():
                return candidate
    return None


def config_few_shot(cfg) -> dict:
    """``compare()``'s few-shot arguments for a run config: ``eval.few_shot`` (null = 3 when
    ``data.train`` is set), the shots from ``data.train``, ``eval.few_shot_select``."""
    k = cfg.eval.few_shot
    if k is None:
        k = DEFAULT_K if cfg.data.train else 0
    return {"few_shot": k, "few_shot_data": cfg.data.train if k else None,
            "few_shot_select": cfg.eval.few_shot_select}
