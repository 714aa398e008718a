"""On-disk cache of GGUF files converted to plain Hugging Face folders.

Converting a GGUF dequantizes every tensor and builds the tokenizer from the file's metadata
(``gguf_convert``: one pass, ~10 s for SmolLM2-135M on 2 cores; transformers' general loader,
for the files that one-pass reader does not reproduce exactly, ~40 s). Both are paid once: the
result is written as a standard folder (``model.safetensors`` + ``config.json`` + tokenizer
files) that ``from_pretrained`` reads in about a second.

Layout::

    <root>/                       platformdirs.user_cache_dir("lorakit"), or $LORAKIT_CACHE_DIR
      gguf_index.json             (path, size, mtime) -> sha256, so big files are hashed once
      models/<sha256 of gguf>/    one entry per GGUF content
        model.safetensors, config.json, generation_config.json, tokenizer*.json, ...
        lorakit_cache.json        manifest: size + sha256 of every file above

An entry is built in a temporary folder next to its final place and renamed into place, so
a crash never leaves a half-written entry. On every use an entry is checked (file sizes, a
full hash of files up to 768 MB, the safetensors header against the file size); a bad entry is
logged, deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "LORAKIT_CACHE_DIR"
MANIFEST = "lorakit_cache.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
# Files up to this size are fully hashed on every load (the 538 MB float32 SmolLM2 weights
# hash in ~0.45 s from the page cache); larger ones are checked by size + safetensors header.
_FULL_HASH_LIMIT = 768 * 1024 * 1024


def cache_root() -> Path:
    """The lorakit cache folder: ``$LORAKIT_CACHE_DIR`` or the platform's user cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lorakit"))


def models_dir() -> Path:
    """Folder holding one converted entry per GGUF content hash."""
    return cache_root() / "models"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_sha256(path: str | os.PathLike) -> str:
    """sha256 of a GGUF file, remembered in a small index keyed by (path, size, mtime).

    Hashing the 98 MB default GGUF takes ~0.25 s; the index makes repeat loads skip it.
    """
    path = Path(path).resolve()
    st = path.stat()
    index_path = cache_root() / "gguf_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if (isinstance(known, dict) and known.get("size") == st.st_size
            and known.get("mtime_ns") == st.st_mtime_ns and isinstance(known.get("sha256"), str)):
        return known["sha256"]
    digest = file_sha256(path)
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        _write_json_atomic(index_path, index)
    except OSError as exc:  # a read-only cache still works, just slower
        logger.debug("could not update %s: %s", index_path, exc)
    return digest


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is structurally broken, or None (header parse + sizes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "file shorter than its header"
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            return "header length past end of file"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not valid JSON"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + n + end != size:
        return f"tensor data ends at byte {8 + n + end} but the file has {size}"
    return None


def verify_entry(entry: str | os.PathLike, *, full: bool = False,
                 weights_hash: bool = True) -> str | None:
    """Check a cache entry against its manifest.

    Args:
        entry: the entry folder.
        full: hash every file, whatever its size.
        weights_hash: hash the weights file when under the size limit (else size + header).

    Returns:
        None when the entry is sound, else a short reason it is not.
    """
    entry = Path(entry)
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return "manifest missing or unreadable"
    if manifest.get("format") != FORMAT_VERSION:
        return f"cache format {manifest.get('format')!r}, expected {FORMAT_VERSION}"
    files = manifest.get("files") or {}
    if WEIGHTS not in files or "config.json" not in files:
        return "manifest lists no weights or config"
    for name, meta in files.items():
        p = entry / name
        if not p.is_file():
            return f"{name} missing"
        if p.stat().st_size != meta["size"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {meta['size']}"
        hash_it = full or (meta["size"] <= _FULL_HASH_LIMIT
                           and (weights_hash or name != WEIGHTS))
        if hash_it and file_sha256(p) != meta["sha256"]:
            return f"{name} content does not match its sha256"
    return _safetensors_problem(entry / WEIGHTS)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` and write a plain HF folder into ``out``: lorakit's one-pass
    reader for the llama / qwen2 files it reproduces exactly (``gguf_convert``), else
    transformers' general GGUF loader."""
    from lorakit.models import gguf_convert

    try:
        gguf_convert.convert(gguf_path, out)
        return
    except gguf_convert.Unsupported as why:
        logger.info("converting %s with transformers' GGUF loader (%s)", gguf_path.name, why)
        for leftover in out.iterdir():
            leftover.unlink()
    _convert_gguf_transformers(gguf_path, out)


def _convert_gguf_transformers(gguf_path: Path, out: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and write a plain HF folder into ``out``."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models; save_model drops the tied copy of
    # lm_head/embed_tokens and from_pretrained re-ties it from config.tie_word_embeddings.
    safetensors.torch.save_model(model, str(out / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_entry(gguf_path: Path, digest: str, entry: Path) -> None:
    from rich.console import Console

    tmp = entry.parent / f".tmp-{digest[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        console = Console(stderr=True)
        start = time.perf_counter()
        message = f"converting GGUF {gguf_path.name} (first time, ~10-40 s)…"
        if not console.is_terminal:  # a spinner draws nothing into a log file
            console.print(message, highlight=False)
        with console.status(message):
            _convert_gguf(gguf_path, tmp)
        files = {}
        for p in sorted(tmp.iterdir()):
            files[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
        manifest = {"format": FORMAT_VERSION, "gguf": str(gguf_path), "gguf_sha256": digest,
                    "gguf_size": gguf_path.stat().st_size, "created": time.time(),
                    "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.replace(tmp, entry)
        except OSError:
            # another process finished the same entry first; theirs is as good as ours
            if verify_entry(entry) is not None:
                raise
        console.print(f"cached converted model in {entry} ({time.perf_counter() - start:.1f} s)",
                      style="dim", highlight=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_gguf_entry(gguf_path: str | os.PathLike, *, weights_hash: bool = True) -> Path:
    """The cache folder for ``gguf_path``, converting (once) if needed.

    Args:
        gguf_path: a ``.gguf`` file.
        weights_hash: also hash the weights file when checking an existing entry (when it is
            under the size limit); a caller that only reads the tokenizer skips it.

    Returns:
        A plain Hugging Face model folder (weights, config, tokenizer).

    Raises:
        OSError / ValueError from transformers when the GGUF cannot be read.
    """
    gguf_path = Path(gguf_path).resolve()
    digest = gguf_sha256(gguf_path)
    entry = models_dir() / digest
    if entry.exists():
        problem = verify_entry(entry, weights_hash=weights_hash)
        if problem is None:
            return entry
        logger.warning("lorakit cache entry %s is corrupt (%s); deleting and rebuilding it",
                       entry, problem)
        print(f"warning: cache entry {entry} is corrupt ({problem}); rebuilding",
              file=sys.stderr)
        shutil.rmtree(entry, ignore_errors=True)
    entry.parent.mkdir(parents=True, exist_ok=True)
    _build_entry(gguf_path, digest, entry)
    return entry
