"""Adding, choosing, disabling, mixing and counting adapters on real (tiny) model families."""

import copy

import pytest
import torch

import lorakit
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.inject import find_targets, linear_layer_names, lora_layers
from lorakit.lora.layers import LoraLayer
from tiny_models import FAMILIES, make_tiny_model, sample_input_ids

from lora.helpers import randomize_adapter  # noqa: E402  (tests/ is on sys.path)


def _cfg(**kw):
    return lorakit.LoraConfig(r=4, lora_alpha=8, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_wraps_every_block_linear_but_not_the_head(family):
    model = make_tiny_model(family)
    head = model.get_output_embeddings()
    n_linear = sum(1 for _, m in model.named_modules()
                   if type(m).__name__ in ("Linear", "Conv1D") and m is not head)
    paths = lorakit.add_adapter(model, _cfg())
    assert len(paths) == n_linear
    assert not isinstance(model.get_output_embeddings(), LoraLayer)
    assert "lm_head" not in linear_layer_names(model)


def test_target_suffixes_regex_and_layers_to_transform():
    model = make_tiny_model("llama")
    assert find_targets(model, _cfg(target_modules=["q_proj", "v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert find_targets(model, _cfg(target_modules=r".*\.1\.mlp\.(up|down)_proj")) == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert find_targets(model, _cfg(target_modules=["o_proj"], layers_to_transform=[1])) == [
        "model.layers.1.self_attn.o_proj"]


def test_unknown_target_lists_available_names():
    model = make_tiny_model("llama")
    with pytest.raises(AdapterError) as err:
        lorakit.add_adapter(model, _cfg(target_modules=["q_projj"]))
    msg = str(err.value)
    assert "did you mean 'q_proj'" in msg and "gate_proj" in msg and "v_proj" in msg
    with pytest.raises(AdapterError, match="Embedding, not a linear layer"):
        lorakit.add_adapter(model, _cfg(target_modules=["embed_tokens"]))


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-2), dict(lora_alpha=0), dict(lora_dropout=1.5),
                                 dict(bias="some"), dict(target_modules="(")])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ConfigError) as err:
        lorakit.LoraConfig.create(**{"r": 8, **bad})
    assert next(iter(bad)) in str(err.value)


def test_unknown_config_field_suggests_nearest():
    with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):
        lorakit.LoraConfig.create(lora_alpah=16)


def test_named_adapters_set_delete_disable():
    model = make_tiny_model("qwen2")
    ids = sample_input_ids()
    base_logits = model(ids).logits
    lorakit.add_adapter(model, _cfg(), name="a")
    randomize_adapter(model, "a", seed=1)
    lorakit.add_adapter(model, _cfg(target_modules=["q_proj", "o_proj"]), name="b")
    randomize_adapter(model, "b", seed=2)
    out_b = model(ids).logits  # adding makes b active
    lorakit.set_adapter(model, "a")
    out_a = model(ids).logits
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base_logits)
    with lorakit.disable_adapters(model):
        assert torch.equal(model(ids).logits, base_logits)
    torch.testing.assert_close(model(ids).logits, out_a)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n or n.endswith(".a") for n in trainable)
    lorakit.delete_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits, out_b)
    lorakit.delete_adapter(model, "b")
    assert not list(lora_layers(model))
    assert torch.equal(model(ids).logits, base_logits)
    with pytest.raises(AdapterError, match="no adapter named 'zz'"):
        lorakit.set_adapter(model, "zz")


def test_disable_adapters_while_merged_is_exactly_base():
    model = make_tiny_model("llama")
    ids = sample_input_ids()
    base_logits = model(ids).logits
    lorakit.add_adapter(model, _cfg())
    randomize_adapter(model)
    tuned = model(ids).logits
    lorakit.merge_adapter(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids).logits, tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("dora", [False, True])
def test_mixed_batch_rows_equal_rows_run_alone(family, dora):
    model = make_tiny_model(family)
    for i, name in enumerate(["a", "b", "c"]):
        lorakit.add_adapter(model, _cfg(use_dora=dora, use_rslora=(name == "c")), name=name)
        randomize_adapter(model, name, seed=i + 10)
    ids = sample_input_ids(batch=5, length=10)
    names = ["a", None, "c", "b", "a"]
    with lorakit.mixed_batch(model, names):
        mixed = model(ids).logits
    for row, name in enumerate(names):
        if name is None:
            with lorakit.disable_adapters(model):
                alone = model(ids[row:row + 1]).logits
        else:
            lorakit.set_adapter(model, name)
            alone = model(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[3])  # different adapters really differ


def test_mixed_batch_generate_matches_single_adapter_generation():
    model = make_tiny_model("llama")
    for i, name in enumerate(["a", "b"]):
        lorakit.add_adapter(model, _cfg(), name=name)
        randomize_adapter(model, name, seed=i, scale=0.5)
    ids = sample_input_ids(batch=3, length=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with lorakit.mixed_batch(model, ["a", "b", None]):
        mixed = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    for row, name in enumerate(["a", "b", None]):
        if name:
            lorakit.set_adapter(model, name)
            alone = model.generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[:1]), **kw)
        else:
            with lorakit.disable_adapters(model):
                alone = model.generate(ids[row:row + 1], attention_mask=torch.ones_like(ids[:1]), **kw)
        assert torch.equal(mixed[row], alone[0])


def test_mixed_batch_rejects_unknown_names_and_wrong_batch():
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, _cfg(), name="a")
    with pytest.raises(AdapterError, match="no adapter named 'x'"):
        with lorakit.mixed_batch(model, ["a", "x"]):
            pass
    with pytest.raises(ValueError, match="3 adapter names for a batch of 2"):
        with lorakit.mixed_batch(model, ["a", None, "a"]):
            model(sample_input_ids(batch=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_counts(family):
    model = make_tiny_model(family)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lorakit.add_adapter(model, _cfg())
    expected = sum(l.lora_A["default"].weight.numel() + l.lora_B["default"].weight.numel()
                   for _, l in lora_layers(model))
    counts = lorakit.trainable_parameters(model)
    assert counts["trainable"] == expected
    assert counts["total"] == total + expected
    assert counts["percent"] == pytest.approx(100 * expected / (total + expected))


def test_trainable_parameters_counts_packed_4bit_logically():
    """A packed weight (as bitsandbytes stores 4-bit: two values per byte) counts its logical shape."""
    model = make_tiny_model("llama")
    before = lorakit.trainable_parameters(model)["total"]
    layer = model.model.layers[0].mlp.down_proj
    logical = layer.weight.shape
    packed = torch.nn.Parameter(torch.zeros(logical.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = type("QS", (), {"shape": logical})()
    layer.weight = packed
    assert lorakit.trainable_parameters(model)["total"] == before


def test_gradients_reach_only_adapter_parameters():
    model = make_tiny_model("mistral")
    lorakit.add_adapter(model, _cfg(use_dora=True))
    model.train()
    ids = sample_input_ids()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_adapter_weights_float32_on_bf16_base():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    lorakit.add_adapter(model, _cfg())
    _, layer = next(lora_layers(model))
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert model(sample_input_ids()).logits.dtype == torch.bfloat16


def test_copy_of_model_is_independent():
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, _cfg())
    twin = copy.deepcopy(model)
    randomize_adapter(twin)
    ids = sample_input_ids()
    assert not torch.allclose(model(ids).logits, twin(ids).logits)


def test_mixed_batch_gathered_path_pads_ranks_and_sees_weight_updates():
    """Adapters of different ranks share one pair of dense products (ranks zero-padded); the
    cached stacks follow in-place weight changes (an optimizer step), replaced weights, and
    added or deleted adapters; a row's result does not depend on the rest of its batch."""
    model = make_tiny_model("llama").eval()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"), name="small")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"), name="big")
    randomize_adapter(model, "small", seed=1)
    randomize_adapter(model, "big", seed=2)
    ids = sample_input_ids(batch=3, length=7)
    names = ["big", "small", None]

    def check():
        with torch.no_grad():
            with lorakit.mixed_batch(model, names):
                mixed = model(ids).logits
            for row, name in enumerate(names):
                if name is None:
                    with lorakit.disable_adapters(model):
                        alone = model(ids[row:row + 1]).logits
                else:
                    lorakit.set_adapter(model, name)
                    alone = model(ids[row:row + 1]).logits
                torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-5)
        return mixed

    first = check()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["small"].weight.mul_(3.0)
    second = check()
    assert not torch.allclose(first[1], second[1]) and torch.allclose(first[0], second[0])
    # a weight replaced (not written in place) is seen too
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["big"].weight = torch.nn.Parameter(layer.lora_B["big"].weight * 2.0,
                                                            requires_grad=False)
    third = check()
    assert not torch.allclose(second[0], third[0]) and torch.equal(second[1], third[1])
    # a row computes bit for bit the same whatever else its batch mixes (one fixed layout)
    with torch.no_grad(), lorakit.mixed_batch(model, ["big", None, "small"]):
        other = model(ids).logits
    assert torch.equal(other[0], third[0])
    names = ["small", "small", "small"]  # every row on one adapter: its slice of the stacks
    check()
    lorakit.delete_adapter(model, "big")
    names = ["small", None, "small"]
    check()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"), name="new")
    randomize_adapter(model, "new", seed=3)
    names = ["new", "small", None]  # an adapter added after a mixed batch joins the next one
    check()


def test_mixed_batch_over_a_bf16_base():
    """Serving over a bf16 base (what `lorakit serve` picks on CPUs with native bf16), adapters
    kept float32: the gathered path's stacks stay float32 (tiny bf16 products ran slower on
    CPU), rows agree with each adapter run alone to bf16 rounding, a base row is exactly the
    base."""
    model = make_tiny_model("llama").eval()
    for i, name in enumerate(["a", "b"]):
        lorakit.add_adapter(model, _cfg(), name=name)
        randomize_adapter(model, name, seed=i + 20)
    model.to(torch.bfloat16)
    for _, layer in lora_layers(model):
        for n in ("a", "b"):
            layer.lora_A[n].float()
            layer.lora_B[n].float()
    ids = sample_input_ids(batch=3, length=9)
    names = ["a", None, "b"]
    with torch.no_grad():
        with lorakit.mixed_batch(model, names):
            mixed = model(ids).logits.float()
        stacks = [layer._stack_cache[3] for _, layer in lora_layers(model)]
        assert stacks and all(a.dtype == b.dtype == torch.float32 for a, b, _, _ in stacks)
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
        with lorakit.disable_adapters(model):  # the same batch (a row's bits can depend on M)
            base = model(ids).logits.float()
        assert torch.equal(mixed[1], base[1])  # a base row gets exact zeros from the adapters
        for row in (0, 2):
            lorakit.set_adapter(model, names[row])
            alone = model(ids[row:row + 1]).logits.float()
            scale = alone.abs().max()
            # the bf16 base's rounding of the batch vs one row
            assert (mixed[row:row + 1] - alone).abs().max() <= 0.03 * scale
            assert not torch.allclose(alone, base[row:row + 1])  # the adapter moves the logits
