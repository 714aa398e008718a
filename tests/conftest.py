import atexit
import os
import shutil
import tempfile

import pytest

# Tests never reach the network: the Hub is offline, caches live in a per-session temp dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# lorakit's cache (GGUF -> HF folder conversions): one fresh folder per test session, never
# the user's ~/.cache/lorakit, shared by every test of the session and by the processes they
# start (it is an environment variable). Converting the embedded SmolLM2 into it costs ~20 s
# once per session. LORAKIT_TEST_CACHE_DIR names a folder to reuse across sessions instead.
if os.environ.get("LORAKIT_TEST_CACHE_DIR"):
    os.environ["LORAKIT_CACHE_DIR"] = os.environ["LORAKIT_TEST_CACHE_DIR"]
else:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="lorakit-test-cache-")
    os.environ["LORAKIT_CACHE_DIR"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded SmolLM2-135M-Instruct tokenizer (real chat template)."""
    from lorakit.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_model():
    """The embedded SmolLM2-135M-Instruct model and tokenizer, float32, loaded once."""
    import torch

    from lorakit.models.load import load_model

    return load_model("smollm2-135m-instruct", dtype=torch.float32)
