"""merge-adapters equals PEFT's add_weighted_adapter, method by method, on tiny adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from export.helpers import make_adapter, save_base
from lorakit.cli import main
from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.combine import merge_adapters

peft = pytest.importorskip("peft")

CASES = [("linear", None), ("cat", None), ("ties", 0.5), ("dare_linear", 0.5), ("dare_ties", 0.3)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny llama base; adapter "a" written by lorakit (q_proj, v_proj; alpha 8) and "b" by
    PEFT (q_proj, k_proj, up_proj; alpha 16, random A and B): different layers, scalings and
    writers."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("combine")
    base = save_base(tmp, "llama")
    a = make_adapter(tmp, base, name="a", target_modules=["q_proj", "v_proj"], lora_alpha=8)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base)
    b_model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], init_lora_weights=False))
    b_model.save_pretrained(tmp / "b")
    return {"base": base, "a": a, "b": tmp / "b", "tmp": tmp}


def _peft_reference(base, folders: dict, out, *, method, weights, density, seed):
    """What PEFT writes: both adapters loaded, seeded, add_weighted_adapter, saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    names = list(folders)
    peft_model = peft.PeftModel.from_pretrained(model, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(folders[name], adapter_name=name)
    torch.manual_seed(seed)
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type=method,
                                    density=density)
    peft_model.save_pretrained(out, selected_adapters=["merged"])
    peft_model.set_adapter("merged")
    return out / "merged", peft_model.eval()


@pytest.mark.parametrize("method,density", CASES)
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_equals_peft_add_weighted_adapter(adapters, tmp_path, method, density, order):
    # (PEFT warns about adapter names inside its "lora_" prefix, such as "a")
    folders = {{"a": "sql", "b": "chat"}[k]: adapters[k] for k in order}
    weights = [0.6, -0.4]
    ours = merge_adapters(folders, tmp_path / "ours", method=method, weights=weights,
                          density=density, seed=3)
    assert ours["module_order"] == str(adapters["base"])  # PEFT's layer order, from the base
    ref, ref_model = _peft_reference(adapters["base"], folders, tmp_path / "ref", method=method,
                                     weights=weights, density=density, seed=3)
    got = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    want = load_file(ref / "adapter_model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    if method.startswith("dare"):  # the drops really happened (and were the same ones)
        assert any((want[k] == 0).any() for k in want if "lora_A" in k)
    got_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    want_cfg = json.loads((ref / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type"):
        assert got_cfg[field] == want_cfg[field], field
    assert set(got_cfg["target_modules"]) == set(want_cfg["target_modules"])
    assert got_cfg["r"] == (8 if method == "cat" else 4)
    # PEFT loads lorakit's folder and computes what its own combined adapter computes
    from transformers import AutoModelForCausalLM

    from tiny_models import sample_input_ids

    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters["base"]),
                                            tmp_path / "ours").eval()
    with torch.no_grad():
        ids = sample_input_ids()
        torch.testing.assert_close(loaded(ids).logits, ref_model(ids).logits, rtol=1e-6, atol=1e-6)


def test_output_loads_in_peft_and_lorakit(adapters, tmp_path):
    """PEFT loads the folder as it loads its own; lorakit's forward equals PEFT's."""
    from transformers import AutoModelForCausalLM

    import lorakit
    from tiny_models import sample_input_ids

    merge_adapters({"a": adapters["a"], "b": adapters["b"]}, tmp_path / "ab", method="cat",
                   weights=[1.0, 0.5])
    ids = sample_input_ids()
    peft_model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(adapters["base"]), tmp_path / "ab").eval()
    ours = AutoModelForCausalLM.from_pretrained(adapters["base"]).eval()
    lorakit.load_adapter(ours, tmp_path / "ab")
    with torch.no_grad():
        want = peft_model(ids).logits
        got = ours(ids).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-4  # the combined adapter does something


def test_cat_of_different_ranks_is_exact(adapters, tmp_path):
    """cat: B A of the result = sum_i w_i s_i B_i A_i, also for adapters of different ranks."""
    wide = make_adapter(adapters["tmp"], adapters["base"], name="wide", r=6, lora_alpha=3,
                        target_modules=["q_proj"], seed=7)
    merge_adapters([("a", adapters["a"]), ("wide", wide)], tmp_path / "c", method="cat",
                   weights=[0.7, 2.0])
    got = load_file(tmp_path / "c" / "adapter_model.safetensors")
    a, w = load_file(adapters["a"] / "adapter_model.safetensors"), load_file(wide / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    want = 0.7 * (8 / 4) * a[f"{key}.lora_B.weight"] @ a[f"{key}.lora_A.weight"] \
        + 2.0 * (3 / 6) * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]
    assert got[f"{key}.lora_A.weight"].shape[0] == 10
    torch.testing.assert_close(got[f"{key}.lora_B.weight"] @ got[f"{key}.lora_A.weight"], want)
    with pytest.raises(AdapterError, match="one rank"):
        merge_adapters([("a", adapters["a"]), ("wide", wide)], tmp_path / "l", method="linear",
                       weights=[1, 1])


def test_cli_writes_the_same_folder(adapters, tmp_path, capsys):
    args = ["merge-adapters", "--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}",
            "--method", "dare_ties", "--weights", "0.6,0.4", "--density", "0.5", "--seed", "9"]
    assert main(args + ["--out", str(tmp_path / "cli"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["r"] == 4
    merge_adapters({"a": adapters["a"], "b": adapters["b"]}, tmp_path / "api",
                   method="dare_ties", weights=[0.6, 0.4], density=0.5, seed=9)
    got, want = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("cli", "api"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert main(args + ["--out", str(tmp_path / "cli")]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="avg", weights=[1, 1]), ConfigError, "unknown merge method 'avg'"),
    (dict(method="linear", weights=[1.0]), ConfigError, "1 weight.*for 2 adapters"),
    (dict(method="ties", weights=[1, 1]), ConfigError, "needs a density"),
    (dict(method="ties", weights=[1, 1], density=1.5), ConfigError, r"density must be in \(0, 1\]"),
    (dict(method="dare_linear", weights=[1, 1], density=0.0), ConfigError, "density must be in"),
    (dict(method="cat", weights=[1, 1], density=0.5), ConfigError, "density applies to"),
])
def test_bad_arguments(adapters, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        merge_adapters({"a": adapters["a"], "b": adapters["b"]}, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_adapters_of_different_bases_are_refused(adapters, tmp_path, capsys):
    other_base = save_base(tmp_path, "llama", name="wider", hidden_size=64)
    other = make_adapter(tmp_path, other_base, name="other", target_modules=["q_proj", "v_proj"])
    with pytest.raises(AdapterError, match="different base models"):
        merge_adapters({"a": adapters["a"], "other": other}, tmp_path / "x", method="linear",
                       weights=[1, 1])
    # a PEFT adapter (no lorakit.json) over the other base: the layer shapes tell
    from transformers import AutoModelForCausalLM

    peft_other = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(other_base),
                                     peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_other.save_pretrained(tmp_path / "peft_other")
    cfg_file = tmp_path / "peft_other" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = None  # nothing names the base: only shapes can tell
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="different shapes"):
        merge_adapters({"b": adapters["b"], "o": tmp_path / "peft_other"}, tmp_path / "x",
                       method="linear", weights=[1, 1])
    assert main(["merge-adapters", "--adapter", f"a={adapters['a']}", "--adapter",
                 f"o={other}", "--method", "cat", "--weights", "1,1", "--out",
                 str(tmp_path / "y")]) == 2
    assert "different base models" in capsys.readouterr().err
