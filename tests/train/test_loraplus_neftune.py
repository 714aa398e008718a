"""LoRA+ (lora.lr_ratio): the optimizer's parameter groups and learning rates against PEFT's
create_loraplus_optimizer; NEFTune (train.neftune_alpha): noise of transformers' size rule on
the input embeddings in train mode, none in eval mode or generation."""

import math

import pytest
import torch

from lorakit.config import load_config
from lorakit.errors import ConfigError
from lorakit.train import common
from tiny_models import make_tiny_model, sample_input_ids


def _lrs_by_name(model, optimizer, prefix=""):
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    # PEFT names DoRA's magnitude `...lora_magnitude_vector.default.weight`, lorakit without
    # the `.weight`: compare names without it
    return {n.removeprefix(prefix).removesuffix(".weight"): lr_of[id(p)]
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("extra", [[], ["lora.dora=true"], ["lora.bias=lora_only"]])
def test_loraplus_groups_and_lrs_equal_peft(extra):
    import peft
    from peft.optimizers import create_loraplus_optimizer

    from lorakit.lora.inject import add_adapter

    cfg = load_config(None, ["lora.r=4", "lora.lr_ratio=16", "train.lr=1e-4",
                             "train.weight_decay=0.01", *extra])
    ours = make_tiny_model("llama")
    add_adapter(ours, cfg.lora.to_lora_config(), name="default")
    optimizer, scheduler = common.optimizer_and_scheduler(ours, cfg, total_steps=10)

    theirs = peft.get_peft_model(make_tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=32, target_modules="all-linear", use_dora=cfg.lora.dora,
        bias=cfg.lora.bias))
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-4,
                                          loraplus_lr_ratio=16)
    expected = _lrs_by_name(theirs, reference, prefix="base_model.model.")
    got = _lrs_by_name(ours, optimizer)
    assert got == pytest.approx(expected)
    assert sorted({round(lr, 12) for lr in got.values()}) == pytest.approx([1e-4, 1.6e-3])
    assert all(got[n] == pytest.approx(1.6e-3) for n in got if "lora_B" in n)
    assert all(got[n] == pytest.approx(1e-4) for n in got if "lora_A" in n)
    # the schedule scales both rates alike and the logged rate is A's
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4 * scheduler.lr_lambdas[0](0))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    rates = scheduler.get_last_lr()
    assert max(rates) / min(rates) == pytest.approx(16)
    # weight decay: none on 1-D parameters, train.weight_decay on the matrices
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (0.01 if group["params"][0].ndim == 2 else 0.0)


def test_without_lr_ratio_every_group_has_train_lr():
    from lorakit.lora.inject import add_adapter

    cfg = load_config(None, ["lora.r=4", "train.lr=3e-4"])
    model = make_tiny_model("llama")
    add_adapter(model, cfg.lora.to_lora_config(), name="default")
    optimizer, _ = common.optimizer_and_scheduler(model, cfg, total_steps=10)
    assert {round(lr, 12) for lr in _lrs_by_name(model, optimizer).values()} == {3e-4}


def test_lr_ratio_needs_an_adapter_and_a_positive_value():
    with pytest.raises(ConfigError, match="method: full trains no adapter"):
        load_config(None, ["method=full", "lora.lr_ratio=16"])
    with pytest.raises(ConfigError, match="lora.lr_ratio"):
        load_config(None, ["lora.lr_ratio=0"])


def _embedding_outputs(model, ids):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda m, i, out: seen.append(out.detach().clone()))  # runs after NEFTune's hook
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return seen[-1]


def test_neftune_noise_in_training_only_with_transformers_size_rule():
    from transformers.integrations.neftune import neftune_post_forward_hook

    alpha = 5.0
    model = make_tiny_model("llama")
    ids = sample_input_ids(batch=4, length=24)
    clean = model.get_input_embeddings()(ids).detach()
    cfg = load_config(None, [f"train.neftune_alpha={alpha}"])
    common.ready_to_train(model, cfg)
    assert model.training
    torch.manual_seed(3)
    noisy = _embedding_outputs(model, ids)
    noise = noisy - clean
    bound = alpha / math.sqrt(ids.shape[1] * clean.shape[-1])  # alpha / sqrt(L d)
    assert float(noise.abs().max()) <= bound * (1 + 1e-6)
    assert float(noise.abs().max()) > 0.95 * bound  # uniform on [-bound, bound]
    assert abs(float(noise.mean())) < 0.05 * bound
    # the same draw as transformers' own hook on the clean embeddings
    torch.manual_seed(3)
    embed = model.get_input_embeddings()
    torch.testing.assert_close(noisy, neftune_post_forward_hook(embed, None, clean))
    # fresh noise every forward in train mode
    assert not torch.equal(_embedding_outputs(model, ids), noisy)
    # eval mode: clean embeddings, so the logits equal a model without NEFTune
    model.eval()
    torch.testing.assert_close(_embedding_outputs(model, ids), clean)
    plain = make_tiny_model("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
        ref = plain.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    assert torch.equal(gen, ref)


def test_neftune_off_by_default_and_positive():
    model = make_tiny_model("llama")
    common.ready_to_train(model, load_config(None, []))
    assert not hasattr(model.get_input_embeddings(), "neftune_noise_alpha")
    with pytest.raises(ConfigError, match="neftune_alpha"):
        load_config(None, ["train.neftune_alpha=-1"])
