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


def test_keys_file_admin_marking_keeps_old_files_valid(tmp_path):
    lines = tmp_path / "keys.txt"
    lines.write_text("sk-a alice\nsk-r root admin\n")
    keys = load_keys(lines)
    assert keys == {"sk-a": "alice", "sk-r": "root"} and keys.admins == {"sk-r"}
    js = tmp_path / "keys.json"
    js.write_text('{"sk-a": "alice", "sk-r": {"owner": "root", "admin": true}}')
    keys = load_keys(js)
    assert keys == {"sk-a": "alice", "sk-r": "root"} and keys.admins == {"sk-r"}
    ring = KeyRing("sk-main", keys)
    assert ring.caller("sk-r").admin and not ring.caller("sk-a").admin
    assert ring.caller("sk-main").admin  # --api-key is the operator's key
    assert ring.caller("sk-a").owner == "alice" and ring.caller("nope") is None
    js.write_text('{"sk-r": {"owner": "root", "admin": "yes"}}')
    with pytest.raises(ConfigError, match="owner names"):
        load_keys(js)


def test_adapter_rights():
    from lorakit.serve.auth import Caller, can_remove, can_use
    from lorakit.serve.engine import AdapterEntry

    static = AdapterEntry("a0", None, "s0", owner=None, source="static")
    alices = AdapterEntry("x", None, "s1", owner="alice")
    alice, bob, root = Caller("alice"), Caller("bob"), Caller("root", admin=True)
    assert can_use(static, bob) and not can_remove(static, bob) and can_remove(static, root)
    assert can_use(alices, alice) and can_remove(alices, alice)
    assert not can_use(alices, bob) and not can_remove(alices, bob)
    assert can_use(alices, root) and can_remove(alices, root)
