"""Metric functions on hand-made cases (lorakit/eval/metrics.py)."""

import math
import sqlite3

import pytest

from lorakit.errors import ConfigError, DataError
from lorakit.eval import metrics as M


@pytest.mark.parametrize("pred, ref, expected", [
    ("Paris", "paris", 1.0),
    ("  Paris.  ", "Paris", 1.0),
    ("The answer is Paris", "Paris", 0.0),
    ("Ｐａｒｉｓ", "paris", 1.0),            # NFKC: full-width letters
    ("Straße", "STRASSE", 1.0),             # casefold
    ("北京。", "北京", 1.0),                  # CJK punctuation dropped
    ("café", "cafe", 0.0),                  # accents matter
    ("a  b\n c", "a b c", 1.0),
])
def test_exact_match(pred, ref, expected):
    assert M.exact_match(pred, ref) == expected


@pytest.mark.parametrize("pred, ref, expected", [
    ('{"a": 1, "b": "x"}', '{"b": "x", "a": 1}', (1.0, 1.0)),
    ('Here you go:\n```json\n{"a": 1, "b": "y"}\n```', '{"a": 1, "b": "x"}', (0.0, 0.5)),
    ('Sure! {"a": 1.0, "b": "x", "c": 3} done', '{"a": 1, "b": "x"}', (0.0, 1.0)),  # extra field
    ('{"a": 1, "b": ', '{"a": 1, "b": "x"}', (0.0, 0.0)),                          # malformed
    ('not json at all', '{"a": 1}', (0.0, 0.0)),
    ('{"ok": 1}', '{"ok": true}', (0.0, 0.0)),                                     # true != 1
    ('[1, 2, 4]', '[1, 2, 3]', (0.0, 2 / 3)),
    ('{"名前": "太郎"}', '{"名前": "太郎"}', (1.0, 1.0)),
    ('42', '42', (1.0, 1.0)),
])
def test_json_scores(pred, ref, expected):
    s = M.json_scores(pred, ref)
    assert (s["json"], s["field_accuracy"]) == pytest.approx(expected)


def test_json_reference_must_parse():
    with pytest.raises(DataError, match="not valid JSON"):
        M.json_scores('{"a": 1}', '{"a": ')


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" / "the cat on the mat" = 5; P = 5/6, R = 5/5
    assert M.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert M.rouge_l("", "anything") == 0.0
    assert M.rouge_l("x y z", "a b c") == 0.0
    # Unicode words count (rouge-score's tokenizer would drop all of these)
    assert M.rouge_l("Привет мир", "привет мир") == 1.0
    assert M.rouge_l("naïve café au lait", "café au lait") == pytest.approx(2 * 0.75 / 1.75)


def test_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer",
                                       reason="rouge-score (dev extra) is the reference")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("The quick brown fox jumps over the lazy dog", "A quick brown dog jumps over the fox"),
             ("police killed the gunman", "the gunman killed police"),
             ("SELECT name FROM users WHERE id = 3;", "select name from users where id=3"),
             ("one two three four five six", "six five four three two one"),
             ("it's 5 o'clock, snake_case and CamelCase", "its 5 oclock snake case camelcase"),
             ("a a a b b", "a b a b a b"), ("completely different", "nothing shared here")]
    for pred, ref in pairs:
        assert M.rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_contains_and_regex():
    assert M.contains("The capital is Paris, France.", "paris") == 1.0
    assert M.contains("Parisian food", "Paris") == 0.0  # whole words only
    assert M.contains("It is 42.", ["41", "42"]) == 1.0
    assert M.contains("anything", "") == 0.0
    assert M.regex_match("Total: 1,234 items", r"\d{1,3}(,\d{3})* items") == 1.0
    assert M.regex_match("none", r"\d+") == 0.0
    with pytest.raises(DataError, match="regular expression"):
        M.regex_match("x", "([unclosed")


def test_sql_metric_and_errors(tmp_path):
    db = tmp_path / "t.db"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
    con.commit()
    con.close()
    sql = M.get_metric("sql", sql_db=db)
    assert sql.score("SELECT x FROM t;", "SELECT x FROM t ORDER BY x DESC")["sql"] == 0.0  # order asked
    assert sql.score("SELECT x FROM t ORDER BY x DESC;", "SELECT x FROM t ORDER BY x DESC")["sql"] == 1.0
    assert sql.score("SELECT nope FROM t;", "SELECT x FROM t")["sql"] == 0.0  # SQL that errors
    assert sql.score("DROP TABLE t;", "SELECT x FROM t")["sql"] == 0.0
    with pytest.raises(ConfigError, match="--sql-db"):
        M.get_metric("sql")
    with pytest.raises(ConfigError, match="no such SQLite file"):
        M.get_metric("sql", sql_db=tmp_path / "missing.db")


def test_unknown_metric_suggests():
    with pytest.raises(ConfigError, match="did you mean 'exact'"):
        M.get_metric("exakt")
    assert M.get_metric("rougeL").name == "rouge-l"


def test_python_scorer(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def length_ok(prediction, reference, example):\n"
        "    return float(len(prediction) <= example.get('max_len', 10))\n"
        "def bad(prediction, reference, example):\n    return 'high'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = M.get_metric("python:my_scores:length_ok")
    assert metric.score("short", None, {"max_len": 5}) == {"python:my_scores:length_ok": 1.0}
    assert metric.score("much too long", None, {"max_len": 5})["python:my_scores:length_ok"] == 0.0
    by_path = M.get_metric(f"python:{tmp_path / 'my_scores.py'}:length_ok")
    assert by_path.score("x" * 11, None, {})[by_path.name] == 0.0
    with pytest.raises(DataError, match="finite number"):
        M.get_metric("python:my_scores:bad").score("x", None, {})
    with pytest.raises(ConfigError, match="no function 'missing'"):
        M.get_metric("python:my_scores:missing")
    with pytest.raises(ConfigError, match="cannot import"):
        M.get_metric("python:no_such_module_xyz:f")


def test_bootstrap_ci_and_win_tie_loss():
    lo, hi = M.bootstrap_ci([0, 1] * 50, seed=0)
    assert lo < 0.5 < hi and 0.38 < lo and hi < 0.62  # ~ mean +- 1.96 * 0.05
    assert M.bootstrap_ci([0.3] * 5) == (0.3, 0.3)
    assert all(math.isnan(v) for v in M.bootstrap_ci([]))
    assert M.win_tie_loss([1, 0, 0.5, 1], [0, 0, 1, 1]) == {"wins": 1, "ties": 2, "losses": 1}
    assert M.perplexity(0.0) == 1.0 and M.perplexity(None) is None
