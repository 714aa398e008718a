"""A real server on 127.0.0.1 (random free port) over a tiny Llama with the SmolLM2 tokenizer,
with four random adapters under an adapter root; tests talk to it with the official
``openai`` client."""

import pytest
import torch

API_KEY = "sk-lorakit-test"
ADAPTERS = ["a0", "a1", "a2", "a3"]


def _tiny_llama(tokenizer, hidden=64, layers=2, rope_theta=10000.0):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                            intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256, tie_word_embeddings=True,
                            rope_theta=rope_theta, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def make_adapter(model, tokenizer, folder, seed, r=4):
    """A LoRA adapter with random (non-zero) B, so it visibly changes the output."""
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import add_adapter, delete_adapter
    from lorakit.lora.io import save_adapter

    add_adapter(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"), "tmp")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B.tmp" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    save_adapter(model, folder, "tmp", tokenizer=tokenizer)
    delete_adapter(model, "tmp")
    return folder


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory, smol_tokenizer):
    """Folders: base model, adapter root with a0..a3 + 'late' + foreign adapters, an outside dir."""
    tmp = tmp_path_factory.mktemp("serve")
    base_dir = tmp / "base"
    base = _tiny_llama(smol_tokenizer)
    base.save_pretrained(base_dir)
    smol_tokenizer.save_pretrained(base_dir)
    from lorakit.models.load import load_model

    model, tokenizer = load_model(base_dir)
    root = tmp / "adapters"
    for i, name in enumerate(ADAPTERS + ["late"]):
        make_adapter(model, tokenizer, root / name, seed=100 + i)
    # adapters of other bases: different width (shapes differ); same shapes, other rope_theta
    make_adapter(_tiny_llama(smol_tokenizer, hidden=32), tokenizer, root / "wide", seed=7)
    (root / "wide" / "lorakit.json").unlink()  # as a PEFT-made adapter: only shapes can tell
    other = _tiny_llama(smol_tokenizer, rope_theta=500.0)
    other.lorakit_spec = "other-base"
    make_adapter(other, tokenizer, root / "other_base", seed=8)
    outside = tmp / "outside"
    make_adapter(model, tokenizer, outside / "evil", seed=9)
    (root / "link_out").symlink_to(outside / "evil", target_is_directory=True)
    return {"base_dir": base_dir, "root": root, "outside": outside, "tokenizer": tokenizer}


@pytest.fixture(scope="session")
def server(serve_env, tmp_path_factory):
    """A running server: base + a0..a3 registered, at most 3 resident (LRU), API key set."""
    from lorakit.models.load import load_model
    from lorakit.serve.api import ServerThread, create_app
    from lorakit.serve.engine import Engine
    from lorakit.serve.monitor import RequestLog

    model, tokenizer = load_model(serve_env["base_dir"])
    engine = Engine(model, tokenizer, base_name="tiny-base", adapter_root=serve_env["root"],
                    max_loaded_adapters=3, max_batch_size=16, max_model_len=256)
    for name in ADAPTERS:
        engine.add_adapter(name, serve_env["root"] / name, wait=False)
    log = RequestLog(tmp_path_factory.mktemp("log") / "requests.db", log_text=True,
                     base_model=str(serve_env["base_dir"]))
    app = create_app(engine, api_key=API_KEY, request_log=log)
    thread = ServerThread(app).start()
    yield {"url": thread.url, "engine": engine, "log": log, "app": app}
    thread.stop()
    engine.stop()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0,
                         timeout=120)
