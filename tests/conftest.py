import atexit
import os
import shutil
import tempfile

import pytest

# Tests never reach the network: the Hub is offline, caches live in a per-session temp dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and every
# process its tests start get an equal share of the cores, so two workers do not run four
# threads on two cores. A test that needs all cores for a measurement sets its own.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _SHARE = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _SHARE)
    os.environ.setdefault("MKL_NUM_THREADS", _SHARE)

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
