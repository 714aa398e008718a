"""Keys and owners (lorakit/serve/auth.py): the keys file's two forms and its errors, and the
key -> owner lookup the API's bearer check and the UI's cookie both use."""

import pytest

from lorakit.errors import ConfigError
from lorakit.serve.auth import DEFAULT_OWNER, KeyRing, load_keys


def test_keys_file_lines_and_json(tmp_path):
    lines = tmp_path / "keys.txt"
    lines.write_text("# team keys\nsk-a alice\n\nsk-b:bob  # colon form\nsk-c   carol\n")
    assert load_keys(lines) == {"sk-a": "alice", "sk-b": "bob", "sk-c": "carol"}
    js = tmp_path / "keys.json"
    js.write_text('{"sk-a": "alice", "sk-b": "bob"}')
    assert load_keys(js) == {"sk-a": "alice", "sk-b": "bob"}


@pytest.mark.parametrize("text, message", [
    ("sk-a alice\nsk-b bob extra\n", "keys.txt:2: expected 'KEY OWNER'"),
    ("# only a comment\n", "no API keys"),
    ('{"sk-a": 3}', "must map API key strings to owner names"),
    ('{"sk-a": ', "not valid JSON"),
])
def test_keys_file_errors_say_where(tmp_path, text, message):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_keys(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_keys(tmp_path / "missing.txt")


def test_key_ring_owner():
    ring = KeyRing("sk-main", {"sk-a": "alice", "sk-b": "bob"})
    assert ring and ring.owner("sk-a") == "alice" and ring.owner("sk-b") == "bob"
    assert ring.owner("sk-main") == DEFAULT_OWNER
    assert ring.owner("sk-a ") is None and ring.owner("") is None and ring.owner("sk-") is None
    assert not KeyRing() and KeyRing().owner("anything") is None
