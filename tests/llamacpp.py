"""llama.cpp as the outside judge of the GGUF tests: the programs `make llamacpp` builds.

`make test` builds llama.cpp once (CPU, from the llama.cpp sources vendored by the pinned
llama-cpp-python sdist) into ``~/.cache/lorakit-build/llama.cpp-<version>/`` and sets
LORAKIT_LLAMACPP_BIN to its ``bin`` folder; the sources (``src/``, with
``convert_lora_to_gguf.py``) sit beside it. Without the variable that cache is searched.
Without them a test is skipped with the reason, except under CI (``CI=true``), where a
missing judge is a failure: CI must never pass by skipping the llama.cpp checks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# loopback only: never through a proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _cache_roots() -> list[Path]:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(xdg) / "lorakit-build", REPO / ".cache"]


def _bin_dir() -> Path | None:
    env = os.environ.get("LORAKIT_LLAMACPP_BIN")
    if env:
        return Path(env)
    for root in _cache_roots():
        built = sorted(p.parent for p in root.glob("llama.cpp-*/bin/.built"))
        if built:
            return built[-1]
    return None


def _missing(what: str) -> None:
    reason = (f"llama.cpp {what} not found (LORAKIT_LLAMACPP_BIN={os.environ.get('LORAKIT_LLAMACPP_BIN')!r}): "
              f"run `make llamacpp` (one-time CPU build), or `make test`, which builds it")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " -- under CI the llama.cpp judge must run, not skip")
    pytest.skip(reason)


def binary(name: str) -> Path:
    """The built llama.cpp program ``name`` (e.g. "llama-server"); skip/fail when absent."""
    folder = _bin_dir()
    path = folder / name if folder else None
    if path is None or not os.access(path, os.X_OK):
        _missing(name)
    return path


def source_file(name: str) -> Path:
    """A file of the llama.cpp sources the binaries are built from (``src/`` beside
    ``bin/``; there as soon as `make llamacpp` has unpacked them)."""
    folder = _bin_dir()
    roots = [folder.parent] if folder else [p for root in _cache_roots()
                                            for p in sorted(root.glob("llama.cpp-*"))][-1:]
    path = roots[0] / "src" / name if roots else None
    if path is None or not path.is_file():
        _missing(f"source {name}")
    return path


def convert_lora(adapter: Path, base: Path, out: Path) -> subprocess.CompletedProcess:
    """llama.cpp's own PEFT -> GGUF LoRA converter, run on ``adapter`` over HF folder ``base``."""
    script = source_file("convert_lora_to_gguf.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(script), str(adapter), "--base", str(base),
                           "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, timeout=300, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llama-server`` on 127.0.0.1 and a free port, serving ``model`` (plus LoRA files);
    started on enter with a bounded wait for /health, always killed on exit."""

    def __init__(self, model: Path, *, lora: list[Path] = (), ctx: int = 512,
                 extra: list[str] = (), ready_timeout: float = 120.0):
        self.cmd = [str(binary("llama-server")), "-m", str(model), "--host", "127.0.0.1",
                    "--port", "0", "-c", str(ctx), "-t", "2", "-np", "1", "--jinja",
                    "--no-webui", "--no-warmup", *extra]
        for path in lora:
            self.cmd += ["--lora", str(path)]
        self.ready_timeout = ready_timeout
        self.proc = None

    def __enter__(self) -> "Server":
        port = _free_port()
        self.cmd[self.cmd.index("--port") + 1] = str(port)
        self.url = f"http://127.0.0.1:{port}"
        self.output = tempfile.TemporaryFile(mode="w+")  # a pipe could fill and block it
        self.proc = subprocess.Popen(self.cmd, stdout=self.output, stderr=subprocess.STDOUT,
                                     text=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.output.seek(0)
                out = self.output.read()
                raise AssertionError(f"llama-server exited with {self.proc.returncode}:\n{out[-4000:]}")
            try:
                with _OPENER.open(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise AssertionError(f"llama-server not ready after {self.ready_timeout} s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output.close()

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(request, timeout=120) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"llama-server {path}: HTTP {exc.code}: {exc.read()[:2000]!r}") from None

    def get(self, path: str) -> dict:
        with _OPENER.open(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        """Up to ``n`` greedy tokens after ``prompt_ids`` (top-k 1, no prompt cache). It stops
        at an end-of-generation token (``ignore_eos`` would instead forbid those tokens, and
        so change the argmax wherever the model wants to stop)."""
        out = self.post("/completion", {
            "prompt": list(map(int, prompt_ids)), "n_predict": n, "temperature": 0.0,
            "top_k": 1, "samplers": ["top_k"], "cache_prompt": False,
            "return_tokens": True, "seed": 0})
        return out["tokens"]

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": False,
                                       "parse_special": True})["tokens"]
