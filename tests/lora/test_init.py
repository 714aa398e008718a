"""lora.init: gaussian, PiSSA, OLoRA and LoftQ start where PEFT's initialisations start."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from lorakit.config import load_config
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora import init as lora_init
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import add_adapter, lora_layers
from lorakit.lora.io import load_adapter, load_adapter_weights, save_adapter
from tiny_models import make_tiny_model, sample_input_ids

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
# float32 SVD / QR: the residual base plus the adapter gives W back to this (measured ~1e-6)
RECONSTRUCTION_ATOL = 1e-5


def _peft_layers(model):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _dense(weight, conv1d):
    return (weight.T if conv1d else weight).detach().float()


# gpt2: Conv1D, weights stored (in, out). PEFT's OLoRA factors the stored (in, out) matrix of a
# Conv1D without transposing it (its A comes out (r, out), the wrong shape), so OLoRA is
# compared on llama only; lorakit factors the (out, in) weight for both layer kinds.
@pytest.mark.parametrize("family,init", [("llama", "pissa"), ("gpt2", "pissa"),
                                         ("llama", "olora")])
@pytest.mark.parametrize("alpha", [8, 4])
def test_pissa_olora_equal_peft(family, init, alpha):
    """A, B and the residual base equal PEFT's; residual + s B A reproduces W."""
    ours = make_tiny_model(family)
    original = {n: p.detach().clone() for n, p in ours.named_parameters()}
    add_adapter(ours, LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS[family],
                                 init_lora_weights=init))
    theirs = peft.get_peft_model(make_tiny_model(family), peft.LoraConfig(
        r=4, lora_alpha=alpha, target_modules=TARGETS[family], init_lora_weights=init))
    peft_layers = _peft_layers(theirs)
    layers = dict(lora_layers(ours))
    assert set(layers) == set(peft_layers) and layers
    for path, layer in layers.items():
        ref = peft_layers[path]
        torch.testing.assert_close(layer.lora_A["default"].weight, ref.lora_A["default"].weight,
                                   rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, ref.lora_B["default"].weight,
                                   rtol=0, atol=0)
        torch.testing.assert_close(layer.base_layer.weight, ref.base_layer.weight, rtol=0, atol=0)
        conv1d = layer.fan_in_fan_out
        w = _dense(original[f"{path}.weight"], conv1d)
        rebuilt = layer.base_weight().float() + layer.delta_weight("default")
        assert (rebuilt - w).abs().max() < RECONSTRUCTION_ATOL
        assert (layer.base_weight().float() - w).abs().max() > 1e-2  # the base really moved
    ids = sample_input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_pissa_niter_matches_peft_up_to_the_random_projection():
    """pissa_niter_K is randomised (torch.svd_lowrank); on weights whose top singular values
    stand out (as trained weights' do) it finds the same top-r subspace as PEFT's: same B A
    and residual, to float tolerance, and the same as the exact SVD."""
    def spiky(model):  # q_proj = U diag(8, 6, 4, 3, 0.01, ...) V^T
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("q_proj"):
                    u, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
                    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
                    s = torch.cat([torch.tensor([8.0, 6, 4, 3]), torch.full((28,), 0.01)])
                    module.weight.copy_(u @ torch.diag(s) @ v.T)
        return model

    ours = spiky(make_tiny_model("llama"))
    add_adapter(ours, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                 init_lora_weights="pissa_niter_4"))
    theirs = peft.get_peft_model(spiky(make_tiny_model("llama")), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"))
    full = spiky(make_tiny_model("llama"))
    add_adapter(full, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    for path, layer in lora_layers(ours):
        ref = _peft_layers(theirs)[path]
        ba = ref.lora_B["default"].weight @ ref.lora_A["default"].weight
        torch.testing.assert_close(layer.delta_weight("default") / 2, ba, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight, ref.base_layer.weight, rtol=1e-3, atol=1e-4)
        exact = dict(lora_layers(full))[path]
        torch.testing.assert_close(layer.delta_weight("default"), exact.delta_weight("default"),
                                   rtol=1e-3, atol=1e-4)


def test_gaussian_init():
    model = make_tiny_model("llama")
    add_adapter(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"],
                                  init_lora_weights="gaussian"))
    a = torch.cat([layer.lora_A["default"].weight.flatten() for _, layer in lora_layers(model)])
    assert all((layer.lora_B["default"].weight == 0).all() for _, layer in lora_layers(model))
    assert abs(a.std().item() - 1 / 8) < 0.01 and abs(a.mean().item()) < 0.01  # N(0, 1/r)


def _perturb(layers_by_path, seed=0):
    """The same "training" step on lorakit's and PEFT's adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in sorted(layers_by_path):
            for which in ("lora_A", "lora_B"):
                w = getattr(layers_by_path[path], which)["default"].weight
                w.add_(torch.randn(w.shape, generator=g) * 0.05)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_saved_adapter_is_for_the_original_base_as_peft_converts_it(init, rslora, tmp_path):
    """Saving converts to a rank-2r LoRA for the original weights, equal to PEFT's
    path_initial_model_for_weight_conversion; loaded on the original base it gives the trained
    model's outputs, and resuming recovers the trained A, B."""
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=init,
               use_rslora=rslora)
    ours = make_tiny_model("llama")
    add_adapter(ours, LoraConfig(**cfg))
    theirs = peft.get_peft_model(make_tiny_model("llama"), peft.LoraConfig(**cfg))
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe
    theirs.save_pretrained(tmp_path / "peft-init")
    theirs.peft_config["default"].init_lora_weights = init
    _perturb(dict(lora_layers(ours)))
    _perturb(_peft_layers(theirs))
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
        tmp_path / "peft-init"))
    from safetensors.torch import load_file

    got = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    got_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    want_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "init_lora_weights"):
        assert got_cfg[field] == pytest.approx(want_cfg[field]), field
    assert got_cfg["r"] == 8

    ids = sample_input_ids()
    fresh = make_tiny_model("llama")  # the original base
    load_adapter(fresh, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-5)
        peft_loaded = peft.PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "ours")
        torch.testing.assert_close(peft_loaded(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-5)

    resumed = make_tiny_model("llama")  # a resumed run: same init again, then the checkpoint
    add_adapter(resumed, LoraConfig(**cfg))
    load_adapter_weights(resumed, tmp_path / "ours")
    for path, layer in lora_layers(resumed):
        trained = dict(lora_layers(ours))[path]
        assert torch.equal(layer.lora_A["default"].weight, trained.lora_A["default"].weight)
        assert torch.equal(layer.lora_B["default"].weight, trained.lora_B["default"].weight)


# ---------------------------------------------------------------------- LoftQ
def _peft_loftq_init_on_cpu():
    """PEFT's own loftq_init, with its hard-coded compute device ("cuda"/"xpu") set to the
    CPU: PEFT runs it on a GPU only, the maths is the same."""
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    source = source.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"')
    assert '"cpu"' in source
    namespace = dict(vars(loftq_utils))
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_equals_peft_loftq_init(num_iter):
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=g) * 0.02
    want_q, want_a, want_b = _peft_loftq_init_on_cpu()(weight, num_bits=4, reduced_rank=8,
                                                       num_iter=num_iter)
    got_q, got_a, got_b = lora_init.loftq(weight, 8, 1.0, num_iter=num_iter)
    for got, want in ((got_q, want_q), (got_a, want_a), (got_b, want_b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = (weight - lora_init.loftq(weight, 8, 1.0, num_iter=1)[0]).norm()
    assert (weight - (got_q + got_b @ got_a)).norm() < 0.9 * plain


@pytest.mark.parametrize("alpha", [4, 16])
def test_loftq_over_the_4bit_base(tmp_path, alpha):
    """QLoRA + lora.init: loftq: the 4-bit base keeps lorakit's codes; A and B equal PEFT's
    LoftQ (one iteration, which keeps the codes) when lora_alpha == r, and in every case
    dequant(Q) + s B A is closer to the unquantized W than dequant(Q)."""
    pytest.importorskip("bitsandbytes")
    from export.helpers import save_base
    from lorakit.models.load import load_model

    # rows of 64: bitsandbytes' CPU kernel needs in_features to be a multiple of the block size
    save_base(tmp_path, "llama", hidden_size=64, intermediate_size=128, head_dim=16)
    dense, _ = load_model(str(tmp_path / "base"), dtype=torch.float32)
    model, _ = load_model(str(tmp_path / "base"), dtype=torch.float32, quantization="nf4",
                          double_quant=False, compute_dtype="float32")
    plain, _ = load_model(str(tmp_path / "base"), dtype=torch.float32, quantization="nf4",
                          double_quant=False, compute_dtype="float32")
    add_adapter(model, LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS["llama"],
                                  init_lora_weights="loftq"))
    add_adapter(plain, LoraConfig(r=4, lora_alpha=alpha, target_modules=TARGETS["llama"]))
    peft_loftq = _peft_loftq_init_on_cpu()
    for path, layer in lora_layers(model):
        w = dense.get_submodule(path).weight.detach().float()
        q = layer.base_weight().float()
        assert torch.equal(q, dict(lora_layers(plain))[path].base_weight().float())  # same codes
        err_plain = (w - q).norm()
        err_loftq = (w - (q + layer.delta_weight("default"))).norm()
        assert err_loftq < 0.95 * err_plain, path
        if alpha == 4:  # scaling 1: PEFT's unscaled LoftQ is the same thing
            want_q, want_a, want_b = peft_loftq(w, num_bits=4, reduced_rank=4, num_iter=1)
            torch.testing.assert_close(q, want_q, rtol=0, atol=0)
            torch.testing.assert_close(layer.lora_A["default"].weight, want_a, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(layer.lora_B["default"].weight, want_b, rtol=1e-6, atol=1e-7)
    with pytest.raises(AdapterError, match="4-bit base"):
        add_adapter(dense, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq"))
    with pytest.raises(AdapterError, match="use lora.init: loftq"):
        add_adapter(plain, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
                    name="p")


# ---------------------------------------------------------------------- config
def test_run_config_lora_init(tmp_path):
    for init, peft_name in lora_init.RUN_CONFIG_INITS.items():
        method = "qlora" if init == "loftq" else "lora"
        cfg = load_config(overrides=[f"lora.init={init}", f"method={method}"])
        assert cfg.lora.to_lora_config().init_lora_weights == peft_name
    with pytest.raises(ConfigError, match="lora.init"):
        load_config(overrides=["lora.init=svd"])
    with pytest.raises(ConfigError, match="loftq .*method: qlora"):
        load_config(overrides=["lora.init=loftq"])
    with pytest.raises(ConfigError, match="4-bit base cannot take"):
        load_config(overrides=["lora.init=pissa", "method=qlora"])
    with pytest.raises(ConfigError, match="init_lora_weights"):
        LoraConfig.create(init_lora_weights="svd")


def test_unconverted_peft_pissa_adapter_is_refused(tmp_path):
    theirs = peft.get_peft_model(make_tiny_model("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path / "raw")  # no conversion: only valid on the residual base
    with pytest.raises(AdapterError, match="saved without conversion"):
        load_adapter(make_tiny_model("llama"), tmp_path / "raw")
    theirs = peft.get_peft_model(make_tiny_model("llama"), peft.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    theirs.save_pretrained(tmp_path / "gauss")
    config = load_adapter(make_tiny_model("llama"), tmp_path / "gauss")  # weights are in the file
    assert config.init_lora_weights is True
