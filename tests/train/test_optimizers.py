"""train.optimizer: adamw | adamw8bit | paged_adamw8bit (bitsandbytes), checked against
bitsandbytes' optimizers run directly, and the planner's optimizer bytes against the state
bitsandbytes really allocates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.config import RunConfig
from lorakit.errors import ConfigError
from lorakit.train import common, distributed

bnb = pytest.importorskip("bitsandbytes")


class _Net(nn.Module):
    """A weight big enough for 8-bit state (>= bitsandbytes' min_8bit_size of 4096), a bias
    (fp32 state, no weight decay) and a frozen weight the optimizer must skip."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(96, 128)  # 12288-element weight, 128-element bias
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)


def _pair():
    torch.manual_seed(0)
    ours, direct = _Net(), _Net()
    direct.load_state_dict(ours.state_dict())
    return ours, direct


def _step_both(opt_ours, opt_direct, ours, direct, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for pa, pb in ((ours.proj.weight, direct.proj.weight), (ours.proj.bias, direct.proj.bias)):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_direct.step()


def _direct(cls, net, lr, wd):
    return cls([{"params": [net.proj.weight], "weight_decay": wd},
                {"params": [net.proj.bias], "weight_decay": 0.0}],
               lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _assert_same(opt_ours, opt_direct, ours, direct):
    for pa, pb in ((ours.proj.weight, direct.proj.weight), (ours.proj.bias, direct.proj.bias)):
        assert torch.equal(pa, pb)
        sa, sb = opt_ours.state[pa], opt_direct.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("name, cls", [("adamw8bit", "AdamW8bit"), ("adamw", None)])
def test_step_equals_the_library_optimizer_run_directly(name, cls):
    ours, direct = _pair()
    cfg = RunConfig(train={"optimizer": name, "lr": 1e-3, "weight_decay": 0.01})
    opt, _ = common.optimizer_and_scheduler(ours, cfg, total_steps=10)
    ref_cls = getattr(bnb.optim, cls) if cls else torch.optim.AdamW
    assert type(opt) is ref_cls
    ref = _direct(ref_cls, direct, 1e-3, 0.01)
    before = ours.proj.weight.detach().clone()
    _step_both(opt, ref, ours, direct)
    assert not torch.equal(before, ours.proj.weight)  # it trained
    _assert_same(opt, ref, ours, direct)
    if cls:  # the big weight really has 8-bit moments; the bias stays fp32 (min_8bit_size)
        assert opt.state[ours.proj.weight]["state1"].dtype == torch.uint8
        assert opt.state[ours.proj.bias]["state1"].dtype == torch.float32
    assert all(p is not ours.frozen.weight for g in opt.param_groups for p in g["params"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="paged optimizers need CUDA")
def test_paged_step_equals_bitsandbytes_on_cuda():
    ours, direct = (m.cuda() for m in _pair())
    cfg = RunConfig(train={"optimizer": "paged_adamw8bit", "lr": 1e-3})
    common.check_optimizer(cfg, torch.device("cuda"))
    opt, _ = common.optimizer_and_scheduler(ours, cfg, total_steps=10)
    assert type(opt) is bnb.optim.PagedAdamW8bit
    ref = _direct(bnb.optim.PagedAdamW8bit, direct, 1e-3, 0.0)
    _step_both(opt, ref, ours, direct)
    torch.cuda.synchronize()
    _assert_same(opt, ref, ours, direct)


def test_paged_on_cpu_is_refused_before_the_model_loads(monkeypatch):
    """bitsandbytes 0.50.2 on CPU only warns ("Paged optimizers are not supported on CPU")
    and runs the unpaged optimizer; lorakit refuses instead, naming adamw8bit."""
    import lorakit.models.load as load

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the optimizer was checked")

    monkeypatch.setattr(load, "load_model", must_not_load)
    cfg = RunConfig(method="qlora", train={"optimizer": "paged_adamw8bit"})
    with pytest.raises(ConfigError, match="train.optimizer=adamw8bit"):
        common.load_base_for_config(cfg, torch.device("cpu"))
    # the unpaged one passes the check on CPU (and reaches the load)
    with pytest.raises(AssertionError, match="was loaded"):
        common.load_base_for_config(RunConfig(method="qlora", train={"optimizer": "adamw8bit"}),
                                    torch.device("cpu"))


def test_default_is_unchanged_and_unknown_names_are_refused():
    assert RunConfig().train.optimizer == "adamw"
    with pytest.raises(Exception, match="adamw8bit"):
        RunConfig(train={"optimizer": "adam8"})


def test_8bit_under_fsdp_is_refused():
    """bitsandbytes' 8-bit kernels refuse FSDP's DTensor shards ("got mixed torch.Tensor and
    DTensor"), so a multi-process FSDP run with them stops before loading."""
    d = distributed.Dist(rank=0, world_size=2, strategy="fsdp")
    cfg = RunConfig(train={"optimizer": "adamw8bit", "strategy": "fsdp"})
    with pytest.raises(ConfigError, match="train.optimizer=adamw with train.strategy=fsdp"):
        distributed.check_compatible(cfg, d)
    distributed.check_compatible(RunConfig(train={"optimizer": "adamw8bit"}),
                                 distributed.Dist(rank=0, world_size=2, strategy="ddp"))


def _state_bytes(opt, param) -> int:
    """Bytes of per-parameter state (moments and their block scales; not the 2 x 256-entry
    quantization maps, constant per tensor)."""
    return sum(v.nbytes for k, v in opt.state[param].items()
               if torch.is_tensor(v) and k not in ("qmap1", "qmap2", "step"))


def test_planner_optimizer_bytes_match_real_state():
    from lorakit.plan.estimate import estimate

    def measured(cls):
        p = nn.Parameter(torch.randn(1024, 1024))
        opt = cls([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        return _state_bytes(opt, p) / p.numel()

    per_param = {"adamw": measured(torch.optim.AdamW), "adamw8bit": measured(bnb.optim.AdamW8bit),
                 "paged_adamw8bit": measured(bnb.optim.PagedAdamW8bit)}
    assert per_param["adamw"] == 8.0
    assert 2.0 < per_param["adamw8bit"] < 2.1  # uint8 x 2 + fp32 absmax per 256-value block
    for name, real in per_param.items():
        est = estimate("smollm2-135m", method="qlora", optimizer=name, seq_len=256)
        got = est.memory_bytes["optimizer"] / est.trainable_parameters
        assert got == pytest.approx(real, rel=0.01), name


def test_preflight_estimate_uses_the_configured_optimizer():
    from lorakit.plan.preflight import estimate_run

    def optim_bytes(name):
        cfg = RunConfig(method="qlora", train={"optimizer": name, "batch_size": 1},
                        data={"max_length": 128}, model="smollm2-135m-instruct")
        return estimate_run(cfg, torch.device("cpu"), "fp32").memory_bytes["optimizer"]

    assert optim_bytes("adamw8bit") == pytest.approx(optim_bytes("adamw") * 2.03125 / 8)


def test_8bit_qlora_run_resumes_exactly(tiny_model_dir, arithmetic_data, tmp_path):
    """A QLoRA run with adamw8bit: its 8-bit moments go through the checkpoint and a resumed
    run ends on the same adapter as one straight run."""
    import shutil

    from safetensors.torch import load_file

    from lorakit.config import load_config
    from lorakit.train.sft import train

    def cfg(out, *extra):
        return load_config(None, [f"model={tiny_model_dir}", f"data.train={arithmetic_data / 'train.jsonl'}",
                                  f"output_dir={out}", "method=qlora", "data.max_length=64",
                                  "train.batch_size=4", "train.precision=fp32", "train.lr=1e-3",
                                  "lora.r=64", "lora.alpha=64", "lora.dropout=0", "train.max_steps=2",
                                  "train.optimizer=adamw8bit", "eval.after_train=false", *extra])

    quiet = dict(progress=False, log=lambda m: None)
    straight = train(cfg(tmp_path / "a"), **quiet)
    c = cfg(tmp_path / "b", "train.save_every=1", "train.keep_checkpoints=5")
    train(c, **quiet)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-1" / "trainer_state.pt",
                       weights_only=True)["optimizer"]["state"]
    # bitsandbytes nests its tensors under one key of each parameter's state
    quant = [v.get("__bnb_optimizer_quant_state__", v) for v in state.values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quant)  # 8-bit moments saved
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-2")
    shutil.rmtree(tmp_path / "b" / "adapter")
    resumed = train(c.model_copy(update={"resume": True}), **quiet)
    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
