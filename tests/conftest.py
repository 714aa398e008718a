import os

import pytest

# Tests never reach the network: the Hub is offline, caches live in a per-session temp dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
