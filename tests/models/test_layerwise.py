"""Layer-by-layer forward (lorakit.models.layerwise): a deferred model's weights read unit by
unit during the forward give the whole model's logits bit for bit, with at most one unit's
weights in memory at a time, with and without an adapter over the base."""

import pytest
import torch

import lorakit
from export.helpers import make_adapter, save_base
from lorakit.errors import ModelLoadError
from lorakit.models.layerwise import layerwise, uncovered
from lorakit.models.load import load_model
from tiny_models import sample_input_ids


def _real_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if not t.is_meta)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("gpt2", {}),
                                              ("llama", {"tie_word_embeddings": True})])
def test_layerwise_logits_equal_the_whole_model_with_one_unit_in_memory(tmp_path, family,
                                                                        overrides):
    base = save_base(tmp_path, family, **overrides)
    whole, _ = load_model(base, dtype=torch.float32, device="cpu")
    model, _ = load_model(base, dtype=torch.float32, device="cpu", defer_weights=True)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    assert _real_bytes(model) == buffers  # no weight read yet
    blocks = [m for m in model.modules()
              if type(m).__name__ in set(model._no_split_modules)]
    block_bytes = sum(p.numel() * p.element_size() for p in whole.parameters()) // len(blocks)
    seen = []  # real bytes at every module's forward: never more than a unit's worth
    hooks = [m.register_forward_hook(lambda *_: seen.append(_real_bytes(model)))
             for m in model.modules()]
    ids = sample_input_ids()
    with torch.no_grad():
        want = whole(ids).logits
        with layerwise(model):
            got = model(ids).logits
    for h in hooks:
        h.remove()
    assert torch.equal(got, want)
    largest = max(p.numel() * p.element_size() for p in whole.parameters())
    assert seen and max(seen) <= buffers + max(largest, block_bytes) * 1.5
    assert max(seen) < 0.5 * sum(p.numel() * p.element_size() for p in whole.parameters())
    assert all(p.is_meta for p in model.parameters())  # dropped again after the forward


def test_layerwise_runs_an_adapter_over_the_deferred_base(tmp_path):
    base = save_base(tmp_path, "llama")
    adapter = make_adapter(tmp_path, base, r=4, target_modules="all-linear")
    whole, _ = load_model(base, dtype=torch.float32, device="cpu")
    lorakit.load_adapter(whole, adapter)
    model, _ = load_model(base, dtype=torch.float32, device="cpu", defer_weights=True)
    lorakit.load_adapter(model, adapter)
    assert uncovered(model) == []
    adapter_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapter_params and all(not p.is_meta for p in adapter_params)
    ids = sample_input_ids()
    with torch.no_grad(), layerwise(model):
        got = model.eval()(ids).logits
    with torch.no_grad():
        want = whole.eval()(ids).logits
    assert torch.equal(got, want)
    assert all(not p.is_meta for p in adapter_params)  # the adapter stays; the base is dropped
    assert all(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)


def test_layerwise_refuses_a_model_with_tensors_no_checkpoint_fills(tmp_path):
    base = save_base(tmp_path, "llama")
    model, _ = load_model(base, dtype=torch.float32, device="cpu")
    with pytest.raises(ModelLoadError, match="defer_weights"):
        with layerwise(model):
            pass
    adapter = make_adapter(tmp_path, base, use_dora=True)  # magnitudes come from the weights
    deferred, _ = load_model(base, dtype=torch.float32, device="cpu", defer_weights=True)
    lorakit.load_adapter(deferred, adapter)
    left = uncovered(deferred)
    assert left and all("lora_magnitude_vector" in n for n in left)
    with pytest.raises(ModelLoadError, match="meta device"):
        with layerwise(deferred):
            pass
