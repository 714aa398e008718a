"""The bundled example's run config lives once, as package data (lorakit/examples/sql.yaml):
``lorakit train`` with no config reads it, and examples/sql.yaml is the same file to copy."""

import fnmatch
from pathlib import Path

import pytest
import yaml

from lorakit import examples
from lorakit.config import load_config

REPO = Path(__file__).resolve().parents[2]
PATH_KEYS = (("data", "train"), ("data", "eval"), ("eval", "sql_db"))


def test_examples_sql_yaml_is_the_packaged_config():
    assert (REPO / "examples" / "sql.yaml").read_bytes() == examples.SQL_CONFIG.read_bytes()


def test_example_config_is_the_yaml_with_absolute_paths_to_the_bundled_files():
    written = yaml.safe_load(examples.SQL_CONFIG.read_text())
    config = examples.example_config()
    for section, key in PATH_KEYS:
        relative = written[section].pop(key)
        absolute = Path(config[section].pop(key))
        assert absolute.is_absolute() and absolute.is_file(), absolute
        assert absolute == Path(examples.__file__).parents[2] / relative
    assert config == written  # nothing else differs
    assert Path(examples.example_config()["data"]["train"]) == examples.SQL_DIR / "train.jsonl"


def test_the_copy_loads_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)
    from_file = load_config("examples/sql.yaml")
    bundled = load_config(None, [], base=examples.example_config())
    for section, key in PATH_KEYS:
        a, b = getattr(getattr(from_file, section), key), getattr(getattr(bundled, section), key)
        assert Path(a).resolve() == Path(b).resolve()
    assert from_file.lora == bundled.lora and from_file.train == bundled.train
    assert from_file.data.packing is bundled.data.packing is False
    assert from_file.eval.metric == bundled.eval.metric == "sql"


def test_package_data_ships_the_yaml():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["lorakit"]
    relative = examples.SQL_CONFIG.relative_to(Path(examples.__file__).parents[1]).as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
