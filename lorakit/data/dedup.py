"""Exact and near-duplicate detection that scales to 100k+ examples.

Near-duplicates are found with MinHash over word 3-gram shingles and LSH banding, all in
numpy: every shingle is hashed once, ``num_perm`` universal hashes give each text a
signature, texts that agree on one whole band of the signature become candidates, and a
candidate is kept when the estimated Jaccard similarity (share of equal signature slots)
reaches ``threshold``. Candidates are linked with union-find, so duplicates form groups.

Text is normalised first (lower case, punctuation dropped, whitespace collapsed), so texts
that differ only in case, punctuation or spacing are near-duplicates with similarity 1.
"""

from __future__ import annotations

import itertools
import string
from collections import defaultdict
from typing import Sequence

import numpy as np

# str.translate is several times faster than a regex over 100k texts
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00bf\u00a1"})


def words(text: str) -> list[str]:
    """The normalised words of ``text``: lower case, punctuation dropped."""
    return text.lower().translate(_PUNCTUATION).split()


def normalize_text(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(words(text))


def word_ids(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Map each normalised text to word ids.

    Returns:
        ``(ids, lengths, vocab_size)``: all texts' word ids concatenated (int64), the number
        of words of each text, and the number of distinct words.
    """
    # a new word gets the next id: the lookups then run in C (map + defaultdict)
    vocab: defaultdict[str, int] = defaultdict(itertools.count().__next__)
    lookup = vocab.__getitem__
    ids: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for t, text in enumerate(texts):
        tokens = text.lower().translate(_PUNCTUATION).split()
        lengths[t] = len(tokens)
        ids.extend(map(lookup, tokens))
    return np.asarray(ids, dtype=np.int64), lengths, len(vocab)


def _shingle_hashes(ids: np.ndarray, lengths: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash every word n-gram of every text (a text shorter than ``ngram`` gives one shingle).

    Returns:
        ``(hashes, counts)``: uint64 shingle hashes of all texts concatenated, and how many
        each text has (0 for an empty text).
    """
    n = len(lengths)
    gap = ngram - 1
    # lay the texts out with `gap` sentinel words after each, so that every window that
    # starts inside a text stays inside it or runs into its own sentinels
    text_of_word = np.repeat(np.arange(n, dtype=np.int64), lengths)
    padded = np.full(len(ids) + gap * n + ngram, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    padded[np.arange(len(ids), dtype=np.int64) + gap * text_of_word] = ids.astype(np.uint64)
    mults = np.random.default_rng(1234).integers(1, 2**63, size=ngram, dtype=np.uint64) | np.uint64(1)
    width = len(padded) - gap
    h = np.zeros(width, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(ngram):
            h = (h ^ (padded[k:k + width] * mults[k])) * np.uint64(0x9E3779B97F4A7C15)
    counts = np.where(lengths > 0, np.maximum(lengths - gap, 1), 0)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1] + gap, out=starts[1:])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.repeat(starts - offsets, counts) + np.arange(counts.sum(), dtype=np.int64)
    return h[pos], counts


def minhash_signatures(texts: Sequence[str], num_perm: int = 64, ngram: int = 3,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures of ``texts`` over word ``ngram`` shingles.

    Returns:
        ``(signatures, empty)``: a (N, num_perm) uint32 array and a bool mask of texts
        with no words (their signatures are meaningless).
    """
    ids, lengths, _ = word_ids(texts)
    hashes, counts = _shingle_hashes(ids, lengths, ngram)
    empty = counts == 0
    sig = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if hashes.size == 0:
        return sig, empty
    seg = np.concatenate([[0], np.cumsum(counts)[:-1]])[~empty]
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    buffer = np.empty_like(hashes)
    rows = np.flatnonzero(~empty)
    with np.errstate(over="ignore"):
        for p in range(num_perm):
            # multiply-shift universal hash: the high 32 bits of a*h + b (in place: 10M+ shingles)
            np.multiply(hashes, a[p], out=buffer)
            np.add(buffer, b[p], out=buffer)
            np.right_shift(buffer, np.uint64(32), out=buffer)
            sig[rows, p] = np.minimum.reduceat(buffer, seg)
    return sig, empty


def _union_find(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges (left[i], right[i]); the smallest
    member's index labels each component."""
    label = np.arange(n, dtype=np.int64)
    if left.size == 0:
        return label
    while True:
        low = np.minimum(label[left], label[right])
        before = label.copy()
        np.minimum.at(label, left, low)
        np.minimum.at(label, right, low)
        while True:  # pointer jumping
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label


def duplicate_edges(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64,
                    bands: int = 16, exact_keys: Sequence | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of texts that are exact or near duplicates.

    Args:
        texts: the texts to compare.
        threshold: minimum estimated Jaccard similarity of word 3-gram sets.
        num_perm: MinHash signature length; ``bands`` must divide it.
        bands: LSH bands; more bands find pairs of lower similarity (more candidates).
        exact_keys: hashable key per text that defines exact duplicates (default: the text).
        seed: seed of the hash functions.

    Returns:
        ``(left, right, exact)``: edge arrays linking duplicates (enough edges to connect
        every duplicate group, not every pair), and for each text the index of the first
        text with the same exact key.
    """
    n = len(texts)
    keys = texts if exact_keys is None else exact_keys
    first: dict = {}
    exact = np.fromiter((first.setdefault(k, i) for i, k in enumerate(keys)), dtype=np.int64, count=n)
    if n == 0:
        return exact, exact, exact
    sig, empty = minhash_signatures(texts, num_perm=num_perm, seed=seed)
    rows = num_perm // bands
    left, right = [exact], [np.arange(n, dtype=np.int64)]
    valid = np.flatnonzero(~empty)
    mixer = np.random.default_rng(seed + 1).integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        for band in range(bands):
            block = sig[valid, band * rows:(band + 1) * rows].astype(np.uint64)
            key = (block * mixer).sum(axis=1)
            _, inverse = np.unique(key, return_inverse=True)
            # link each bucket member to the bucket's first member (a star, not all pairs,
            # so one huge bucket of copies costs O(size), not O(size^2))
            rep = np.full(inverse.max() + 1, len(valid), dtype=np.int64)
            np.minimum.at(rep, inverse, np.arange(len(valid)))
            rep = rep[inverse]
            cand = np.flatnonzero(rep != np.arange(len(valid)))
            if cand.size == 0:
                continue
            a, b = valid[rep[cand]], valid[cand]
            similarity = (sig[a] == sig[b]).mean(axis=1)
            keep = similarity >= threshold
            left.append(a[keep])
            right.append(b[keep])
    return np.concatenate(left), np.concatenate(right), exact


def connected_groups(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """For each of ``n`` items, the smallest index in its group under the edges; edges
    touching an index ``>= n`` are ignored (so a subset's groups come from the same edges)."""
    keep = (left < n) & (right < n)
    return _union_find(n, left[keep], right[keep])


def duplicate_groups(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 64,
                     bands: int = 16, exact_keys: Sequence | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Group texts that are exact or near duplicates of each other.

    Arguments as in :func:`duplicate_edges`.

    Returns:
        ``(group, exact_group)``: for each text the index of the first text of its
        near-duplicate group and of its exact-duplicate group (a text alone in its group
        points to itself). Exact duplicates are always in the same near group.
    """
    left, right, exact = duplicate_edges(texts, threshold, num_perm, bands, exact_keys, seed)
    return connected_groups(len(texts), left, right), exact
