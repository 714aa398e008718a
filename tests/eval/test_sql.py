"""Text-to-SQL scorer (lorakit/eval/sql.py) and the examples/sql dataset it scores."""

import hashlib
import json
import sqlite3
import subprocess
import sys

import pytest

from lorakit.eval.sql import (EXAMPLE_DB, EXAMPLE_DIR, execution_accuracy, execution_match,
                              extract_sql, load_sql_example, run_sql)

SPLITS = ("train", "eval")


@pytest.fixture
def db(tmp_path):
    """A tiny database built in the test, so scorer checks don't depend on the example."""
    path = tmp_path / "t.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INTEGER);
        INSERT INTO people VALUES (1, 'Ann', 'Lyon', 30), (2, 'Bob', 'Oslo', 25),
                                  (3, 'Cid', 'Lyon', 41), (4, 'Dee', 'Rome', 25);
    """)
    con.commit()
    con.close()
    return path


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- extract_sql

@pytest.mark.parametrize("text, expected", [
    ("SELECT 1;", "SELECT 1;"),
    ("  SELECT 1 ;  \n", "SELECT 1 ;"),
    ("```sql\nSELECT name FROM people;\n```", "SELECT name FROM people;"),
    ("```\nSELECT name FROM people;\n```\nThis lists everyone.", "SELECT name FROM people;"),
    ("```SQL\nSELECT 1\n```", "SELECT 1"),
    ("SQL: SELECT 1;", "SELECT 1;"),
    ("sql query: SELECT 1;", "SELECT 1;"),
    ("SELECT 1; SELECT 2;", "SELECT 1;"),
    ("SELECT 1; -- done. Explanation follows", "SELECT 1;"),
    ("SELECT name FROM people WHERE name = 'a;b'; trailing", "SELECT name FROM people WHERE name = 'a;b';"),
    ("Here is the query: SELECT 1;", "SELECT 1;"),
    ("With this schema you can write SELECT 2;", "SELECT 2;"),
    ("WITH t AS (SELECT 1) SELECT * FROM t;", "WITH t AS (SELECT 1) SELECT * FROM t;"),
    ("SELECT 1\n\nThis returns one.", "SELECT 1"),
    ("", ""),
])
def test_extract_sql(text, expected):
    assert extract_sql(text) == expected


# ---------------------------------------------------------------- run_sql

def test_run_sql_returns_rows(db):
    assert run_sql(db, "SELECT name FROM people WHERE city = 'Lyon' ORDER BY id") == [("Ann",), ("Cid",)]


@pytest.mark.parametrize("sql", ["SELEC name FROM people", "SELECT nope FROM people",
                                 "SELECT * FROM missing", "", "SELECT 1; SELECT 2"])
def test_run_sql_errors_give_none(db, sql):
    assert run_sql(db, sql) is None


def test_run_sql_missing_db_is_not_created(tmp_path):
    path = tmp_path / "absent.db"
    assert run_sql(path, "SELECT 1") is None
    assert not path.exists()


@pytest.mark.parametrize("sql", [
    "DELETE FROM people",
    "DROP TABLE people",
    "UPDATE people SET age = 0",
    "INSERT INTO people VALUES (5, 'Eve', 'Oslo', 50)",
    "CREATE TABLE x (a)",
    "ATTACH DATABASE 'other.db' AS other",
    "PRAGMA journal_mode = DELETE",
])
def test_writes_are_refused_and_db_unchanged(db, sql):
    before = _digest(db)
    assert run_sql(db, sql) is None
    assert _digest(db) == before
    assert run_sql(db, "SELECT COUNT(*) FROM people") == [(4,)]


def test_writes_refused_by_read_only_connection_alone(db, monkeypatch):
    # without the authorizer, mode=ro still refuses the write
    import lorakit.eval.sql as sql_mod

    monkeypatch.setattr(sql_mod, "_authorize", lambda *a: sqlite3.SQLITE_OK)
    before = _digest(db)
    assert run_sql(db, "DELETE FROM people") is None
    assert run_sql(db, "DROP TABLE people") is None
    assert _digest(db) == before


def test_runaway_query_is_stopped(db):
    forever = ("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
               "SELECT COUNT(*) FROM n")
    assert run_sql(db, forever, timeout_s=0.2) is None


# ---------------------------------------------------------------- execution_match

def test_equal_results_different_text_match(db):
    ref = "SELECT COUNT(*) FROM people WHERE city = 'Lyon';"
    assert execution_match("select count(id) from people where city='Lyon'", ref, db) == 1.0
    assert execution_match("SELECT COUNT(*) FROM people WHERE age > 29;", ref, db) == 1.0


def test_different_results_do_not_match(db):
    ref = "SELECT COUNT(*) FROM people WHERE city = 'Lyon';"
    assert execution_match("SELECT COUNT(*) FROM people;", ref, db) == 0.0
    assert execution_match("SELECT name FROM people WHERE city = 'Lyon';", ref, db) == 0.0


def test_unordered_reference_ignores_row_order_but_not_multiplicity(db):
    ref = "SELECT age FROM people;"
    assert execution_match("SELECT age FROM people ORDER BY age DESC;", ref, db) == 1.0
    assert execution_match("SELECT DISTINCT age FROM people;", ref, db) == 0.0


def test_order_by_reference_is_order_sensitive(db):
    ref = "SELECT name FROM people ORDER BY age DESC, name ASC;"
    assert execution_match("SELECT name FROM people ORDER BY age DESC, name ASC;", ref, db) == 1.0
    assert execution_match("SELECT name FROM people ORDER BY age ASC, name ASC;", ref, db) == 0.0


def test_float_results_compare_with_tolerance(db):
    ref = "SELECT AVG(age) FROM people;"
    assert execution_match("SELECT SUM(age) * 1.0 / COUNT(*) FROM people;", ref, db) == 1.0


def test_invalid_or_empty_prediction_scores_zero(db):
    ref = "SELECT name FROM people;"
    assert execution_match("SELECT name FORM people;", ref, db) == 0.0
    assert execution_match("Ann, Bob, Cid and Dee.", ref, db) == 0.0
    assert execution_match("", ref, db) == 0.0


def test_fenced_prediction_is_scored(db):
    pred = "Sure!\n```sql\nSELECT name FROM people WHERE age = 25;\n```\nThis finds them."
    assert execution_match(pred, "SELECT name FROM people WHERE age = 25;", db) == 1.0


def test_write_prediction_scores_zero_and_leaves_db(db):
    before = _digest(db)
    assert execution_match("DELETE FROM people;", "SELECT COUNT(*) FROM people;", db) == 0.0
    assert _digest(db) == before


def test_execution_accuracy(db):
    refs = ["SELECT COUNT(*) FROM people;", "SELECT name FROM people WHERE city = 'Oslo';"]
    assert execution_accuracy(["SELECT 4;", "SELECT 'Bob';"], refs, db) == 1.0
    assert execution_accuracy(["SELECT 4;", "SELECT 'Ann';"], refs, db) == 0.5
    assert execution_accuracy(["nonsense", "DROP TABLE people;"], refs, db) == 0.0
    assert execution_accuracy([], [], db) == 0.0
    with pytest.raises(ValueError):
        execution_accuracy(["SELECT 1;"], refs, db)


# ---------------------------------------------------------------- the example dataset

def test_example_db_is_small():
    assert EXAMPLE_DB.stat().st_size < 200_000


@pytest.mark.parametrize("split", SPLITS)
def test_every_example_executes_with_a_nonempty_result(split):
    records = load_sql_example(split)
    assert len(records) >= (300 if split == "train" else 80)
    for r in records:
        assert set(r) == {"prompt", "completion"}
        assert r["prompt"].startswith("Schema: ") and "\nQuestion: " in r["prompt"]
        sql = r["completion"]
        assert sql == extract_sql(sql) and sql.endswith(";") and "\n" not in sql
        rows = run_sql(EXAMPLE_DB, sql)
        assert rows, sql
        assert rows not in ([(None,)], [(0,)]), sql
        assert execution_match(sql, sql, EXAMPLE_DB) == 1.0


def test_eval_is_held_out_from_train():
    train, evals = load_sql_example("train"), load_sql_example("eval")
    questions = lambda rs: {r["prompt"] for r in rs}  # noqa: E731
    assert not questions(train) & questions(evals)
    # stricter: no eval query (slot combination) is ever answered in train
    assert not {r["completion"] for r in train} & {r["completion"] for r in evals}
    assert len(questions(evals)) == len(evals)


def test_build_is_deterministic_and_matches_committed_files(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([sys.executable, str(EXAMPLE_DIR / "build.py"), "--out", str(out)],
                       check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        first = (tmp_path / "a" / name).read_bytes()
        assert first == (tmp_path / "b" / name).read_bytes()
        assert first == (EXAMPLE_DIR / name).read_bytes(), f"{name} is stale: rerun build.py"
    def dump(path):
        con = sqlite3.connect(path)
        try:
            return list(con.iterdump())
        finally:
            con.close()

    assert dump(tmp_path / "a" / "shop.db") == dump(EXAMPLE_DB)
    assert all(json.loads(line) for line in (tmp_path / "a" / "eval.jsonl").open())
