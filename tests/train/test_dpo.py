"""The DPO recipe on a tiny model: the loss, rewards and gradients against TRL's DPOTrainer,
the reference without a second model copy (adapters off, or a frozen init_adapter), cached
reference log-probs, exact resume, and config / data errors."""

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from run_helpers import adapter_tensors as _adapter
from run_helpers import max_abs_diff
from run_helpers import metrics_records as _records
from run_helpers import rewind
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.errors import AdapterError, ConfigError, DataError
from lorakit.train import dpo

EXAMPLE = Path(dpo.__file__).parents[1] / "examples" / "json_pref"
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    """12 train and 4 eval pairs from the bundled JSON-vs-broken-JSON example."""
    folder = tmp_path_factory.mktemp("pairs")
    rows = (EXAMPLE / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(rows[:12]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(rows[12:16]) + "\n")
    return folder


def _cfg(model_dir, data, out, *extra):
    return load_config(None, [f"model={model_dir}", "method=dpo",
                              f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}",
                              f"output_dir={out}", "data.max_length=96", "train.batch_size=4",
                              "train.precision=fp32", "train.lr=2e-3", "lora.r=4", "lora.alpha=8",
                              "lora.dropout=0.1", *extra])


def _batch(cfg, n=4):
    model, tokenizer, _, has_ref = dpo.setup_model(cfg, torch.device("cpu"), "fp32")
    pairs, _ = dpo.prepare_pairs(cfg, tokenizer, log=lambda m: None)
    batch = dpo.make_batch(pairs, list(range(n)), tokenizer.pad_token_id, torch.device("cpu"))
    return model, tokenizer, batch, has_ref


def _randomise_adapter(model, name="default", std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f"lora_B.{name}." in pname:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------- against TRL
def _trl_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, *, beta, loss_type,
              label_smoothing=0.0, model=None, input_ids=None):
    """TRL's DPOTrainer._compute_loss itself, on given log-probs (or a real model), with the
    reference log-probs passed in as TRL does when it precomputes them. The trainer object is
    a namespace holding the attributes that method reads."""
    from trl import DPOTrainer

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                  gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator,
                              aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
                              f_divergence_type="reverse_kl", loss_types=[loss_type],
                              loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                              use_weighting=False, _metrics={"train": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1)
    if model is None:
        zeros = torch.zeros_like(per_token_logps)

        def model(**kwargs):  # what TRL's fused LM head returns
            return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                                   is_top1=zeros.bool())
        input_ids = torch.zeros(completion_mask.shape, dtype=torch.long)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, trainer._metrics["train"]


def _random_logps(B=4, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):  # a prompt of 2-4 tokens, then an answer of varying length
        start = 2 + row % 3
        completion[row, start:start + 2 + (row * 5) % (T - start - 1)] = 1
    per_token = (-torch.rand(2 * B, T - 1, generator=g) * 3) * completion[:, 1:]
    ref = -torch.rand(2 * B, generator=g) * 3 * completion.sum(1)
    return per_token.requires_grad_(True), completion, ref[:B], ref[B:]


@pytest.mark.parametrize("loss_type, beta, smoothing", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0),
    ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0), ("sigmoid", 0.1, 0.2), ("sigmoid", 1.0, 0.05)])
def test_loss_rewards_and_gradients_equal_trl(loss_type, beta, smoothing):
    per_token, completion, ref_c, ref_r = _random_logps()
    B = len(ref_c)
    # ours: summed answer log-probs, the per-pair loss averaged
    logps = per_token.sum(1)
    losses, rc, rr = dpo.dpo_loss(logps[:B], logps[B:], ref_c, ref_r, beta=beta, loss=loss_type,
                                  label_smoothing=smoothing, chosen_tokens=completion[:B].sum(1),
                                  rejected_tokens=completion[B:].sum(1))
    ours = losses.mean()
    (grad_ours,) = torch.autograd.grad(ours, per_token)
    if smoothing:
        # TRL >= 1.0 dropped cDPO smoothing from "sigmoid"; its "aot" loss applies the same
        # smoothed expression to sorted log-ratios, which for one pair is that pair's cDPO loss
        theirs = torch.stack([_trl_loss(per_token[[i, B + i]], completion[[i, B + i]],
                                        ref_c[[i]], ref_r[[i]], beta=beta, loss_type="aot",
                                        label_smoothing=smoothing)[0] for i in range(B)]).mean()
        metrics = None
    else:
        theirs, metrics = _trl_loss(per_token, completion, ref_c, ref_r, beta=beta,
                                    loss_type=loss_type)
    (grad_theirs,) = torch.autograd.grad(theirs, per_token)
    assert abs(float(ours) - float(theirs)) <= 1e-6 * max(1.0, abs(float(theirs)))
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-6, rtol=1e-6)
    assert float(grad_ours.abs().sum()) > 0
    if metrics is not None:
        for key, value in (("rewards/chosen", rc.mean()), ("rewards/rejected", rr.mean()),
                           ("rewards/margins", (rc - rr).mean()),
                           ("rewards/accuracies", (rc > rr).float().mean())):
            assert metrics[key][-1] == pytest.approx(float(value), abs=1e-6), key


def test_model_batch_loss_and_adapter_gradients_equal_trl(tiny_model_dir, pairs_data, tmp_path):
    """The whole forward on a tiny model: our summed answer log-probs, loss and LoRA gradients
    against TRL's DPOTrainer loss with TRL's own fused LM head, on the same tokenised batch."""
    from trl.trainer.utils import add_fused_lm_head

    from lorakit.lora.inject import disable_adapters

    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", "lora.dropout=0.0")
    model, _, batch, has_ref = _batch(cfg)
    _randomise_adapter(model)  # the policy differs from the reference
    model.train()
    B = batch["input_ids"].shape[0] // 2
    scored = dpo.score_batch(model, batch, None, cfg, "fp32", torch.device("cpu"), has_ref)
    ours = scored["losses"].mean()
    ours.backward()
    grads_ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    completion = (batch["labels"] != -100).long()
    with torch.no_grad(), disable_adapters(model):
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], fused_lm_head=True).log_probs.sum(1)
    theirs, metrics = _trl_loss(None, completion, ref[:B], ref[B:], beta=cfg.dpo.beta,
                                loss_type="sigmoid", model=model, input_ids=batch["input_ids"])
    theirs.backward()
    # float32 sums of ~30 token log-probs of size ~10: they agree to float32 rounding
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    assert float(ours) != pytest.approx(math.log(2), abs=1e-4)  # the adapter matters here
    assert metrics["rewards/chosen"][-1] == pytest.approx(float(scored["chosen_rewards"].mean()),
                                                          abs=1e-5)
    assert metrics["logps/chosen"][-1] == pytest.approx(float(scored["chosen_logps"].mean()),
                                                        rel=1e-6)
    for name, g in grads_ours.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, atol=1e-6,
                                   rtol=1e-4)


# ---------------------------------------------------------------------- the reference
def test_fresh_adapter_is_log2_and_reference_is_the_same_weights(tiny_model_dir, pairs_data,
                                                                  tmp_path, monkeypatch):
    import copy

    from transformers import AutoModelForCausalLM

    def no_model_copies(obj, *a, **k):
        assert not isinstance(obj, torch.nn.Module) or not list(obj.parameters()), \
            f"deepcopy of a {type(obj).__name__}"
        return real_deepcopy(obj, *a, **k)

    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run")
    model, _, batch, has_ref = _batch(cfg)
    assert not has_ref
    # one copy of the base weights: every parameter is the base's or the adapter's
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_base = sum(p.numel() for p in base.parameters())
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) == n_base + n_adapter
    scored = dpo.score_batch(model, batch, None, cfg, "fp32", torch.device("cpu"), has_ref)
    assert torch.equal(scored["losses"], torch.full_like(scored["losses"], math.log(2)))
    assert not scored["chosen_rewards"].any() and not scored["rejected_rewards"].any()
    # the reference is exactly the plain base model, also once the adapter has moved
    _randomise_adapter(model)
    with dpo.reference(model, has_ref):
        ref_logps, _ = dpo.sequence_logps(model, batch)
    base_logps, _ = dpo.sequence_logps(base, batch)
    torch.testing.assert_close(ref_logps, base_logps, atol=1e-5, rtol=1e-6)
    policy_logps, _ = dpo.sequence_logps(model, batch)
    assert (policy_logps - ref_logps).abs().max() > 1e-3


def test_init_adapter_is_the_frozen_reference_and_the_trainable_start(tiny_model_dir, pairs_data,
                                                                      tmp_path):
    from lorakit.lora.inject import add_adapter
    from lorakit.lora.io import save_adapter
    from lorakit.models.load import load_model

    # an "SFT" adapter that changes the model
    sft_model, tokenizer = load_model(str(tiny_model_dir), dtype=torch.float32)
    add_adapter(sft_model, load_config(None, ["lora.r=4"]).lora.to_lora_config())
    _randomise_adapter(sft_model, std=0.2, seed=3)
    sft = save_adapter(sft_model, tmp_path / "sft" / "adapter", tokenizer=tokenizer)

    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", f"init_adapter={sft}",
               "train.max_steps=3", "lora.dropout=0.0")
    model, _, batch, has_ref = _batch(cfg)
    assert has_ref
    scored = dpo.score_batch(model, batch, None, cfg, "fp32", torch.device("cpu"), has_ref)
    assert torch.equal(scored["losses"], torch.full_like(scored["losses"], math.log(2)))
    assert not scored["chosen_rewards"].any() and not scored["rejected_rewards"].any()
    # the reference is base + SFT adapter, not the plain base (LLaMA-Factory issue 913)
    with dpo.reference(model, has_ref):
        ref_logps, _ = dpo.sequence_logps(model, batch)
    sft_model.eval()
    torch.testing.assert_close(ref_logps, dpo.sequence_logps(sft_model, batch)[0], atol=1e-5,
                               rtol=1e-6)
    from lorakit.lora.inject import disable_adapters

    with torch.no_grad(), disable_adapters(model):
        assert (dpo.sequence_logps(model, batch)[0] - ref_logps).abs().max() > 1e-2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    result = dpo.train(cfg, **QUIET)
    records = [r for r in _records(result.run_dir) if "rewards/chosen" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert records[0]["rewards/chosen"] == 0 and records[0]["rewards/rejected"] == 0
    assert records[-1]["rewards/margin"] > 0
    tuned, start = _adapter(result.adapter_dir), _adapter(sft)
    assert tuned.keys() == start.keys()
    assert max(float((tuned[k] - start[k]).abs().max()) for k in tuned) > 0  # the policy moved
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert str(sft) in summary["reference"]


def test_init_adapter_for_another_base_is_an_error(tiny_model_dir, pairs_data, tmp_path):
    from lorakit.lora.inject import add_adapter
    from lorakit.lora.io import save_adapter
    from tiny_models import make_tiny_model

    other = make_tiny_model("llama")
    add_adapter(other, load_config(None, ["lora.r=4"]).lora.to_lora_config())
    folder = save_adapter(other, tmp_path / "other")
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", f"init_adapter={folder}")
    with pytest.raises(AdapterError):
        dpo.train(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- the recipe
def test_precomputed_reference_is_cached_and_gives_the_same_losses(tiny_model_dir, pairs_data,
                                                                   tmp_path):
    extra = ("train.max_steps=2", "train.eval_every=2")
    plain = dpo.train(_cfg(tiny_model_dir, pairs_data, tmp_path / "a", *extra), **QUIET)
    cached = dpo.train(_cfg(tiny_model_dir, pairs_data, tmp_path / "b", *extra,
                            "dpo.precompute_reference=true"), **QUIET)
    cache = load_file(str(cached.run_dir / "reference_logps.safetensors"))
    assert cache["train_chosen"].shape == (12,) and cache["eval_rejected"].shape == (4,)
    assert not (plain.run_dir / "reference_logps.safetensors").exists()
    a, b = _records(plain.run_dir), _records(cached.run_dir)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin",
                    "eval_loss", "eval_rewards/accuracy"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), key
    # the cache holds the base's log-probs: a fresh reference pass agrees with it
    fresh = _cfg(tiny_model_dir, pairs_data, tmp_path / "c")
    model, tokenizer, _, _ = dpo.setup_model(fresh, torch.device("cpu"), "fp32")
    pairs, _ = dpo.prepare_pairs(fresh, tokenizer, log=lambda m: None)
    chosen, rejected = dpo.reference_logps(model, pairs, [[0, 1], [5]], tokenizer.pad_token_id,
                                           torch.device("cpu"), "fp32", False)
    torch.testing.assert_close(chosen[[0, 1, 5]], cache["train_chosen"][[0, 1, 5]], atol=1e-4,
                               rtol=1e-6)


def test_two_plus_two_resumed_steps_equal_four_and_metrics_are_complete(tiny_model_dir,
                                                                        pairs_data, tmp_path):
    extra = ("train.max_steps=4", "train.eval_every=2", "dpo.precompute_reference=true",
             "train.save_every=2", "train.keep_checkpoints=5")
    straight = dpo.train(_cfg(tiny_model_dir, pairs_data, tmp_path / "a", *extra), **QUIET)
    # the same run, forgotten after step 2, then resumed from there in a fresh model
    rewind(shutil.copytree(tmp_path / "a", tmp_path / "b"))
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "b", *extra)
    logs = []
    resumed = dpo.train(cfg.model_copy(update={"resume": True}), progress=False, log=logs.append)
    assert any("reusing" in m for m in logs)  # the cached reference log-probs
    assert max_abs_diff(_adapter(straight.adapter_dir), _adapter(resumed.adapter_dir)) <= 1e-6
    records = _records(resumed.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                "rewards/margin", "logps/chosen", "logps/rejected", "lr", "grad_norm"):
        assert all(key in r for r in records), key
    assert "eval_rewards/accuracy" in records[1] and "eval_logps/chosen" in records[3]
    straight_losses = [r["loss"] for r in _records(straight.run_dir)]
    assert [r["loss"] for r in records] == pytest.approx(straight_losses, abs=1e-6)
    # it learns: held-out reward margin grows from 0
    assert records[3]["eval_rewards/margin"] > records[1]["eval_rewards/margin"] > 0
    for name in ("config.yaml", "adapter/adapter_model.safetensors", "loss.png", "rewards.png",
                 "reward_accuracy.png", "summary.json"):
        assert (resumed.run_dir / name).is_file(), name
    written = load_config(resumed.run_dir / "config.yaml")
    assert written.method == "dpo" and not written.quantized
    assert written.dpo.precompute_reference


def test_cli_runs_dpo_and_sft_weight_adds_the_chosen_nll(tiny_model_dir, pairs_data, tmp_path,
                                                          capsys):
    extra = ("train.max_steps=1", "dpo.sft_weight=0.5")
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", *extra)
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    assert main(["train", str(config), "--no-progress"]) == 0  # `lorakit train` dispatches here
    assert "eval reward accuracy" in capsys.readouterr().out
    record = _records(tmp_path / "run")[0]
    from lorakit.train.common import DataOrder, supervised_loss

    # step 1's pairs; the policy is still the base (B = 0), so its chosen NLL is the base's
    idx = DataOrder(12, 4, seed=0).rows(0)
    model, tokenizer, _, _ = dpo.setup_model(cfg, torch.device("cpu"), "fp32")
    pairs, _ = dpo.prepare_pairs(cfg, tokenizer, log=lambda m: None)
    batch = dpo.make_batch(pairs, idx, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        nll, n = supervised_loss(model, {k: v[:4] for k, v in batch.items()})
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert record["sft_loss"] == pytest.approx(float(nll / n), rel=1e-5)


def test_qlora_dpo_runs_over_a_4bit_base(tiny_model_dir, pairs_data, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", "train.max_steps=2",
               "quantization.type=nf4", "quantization.compute_dtype=float32")
    assert cfg.quantized
    result = dpo.train(cfg, **QUIET)
    manifest = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert manifest["quantization"]["type"] == "nf4"
    records = _records(result.run_dir)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[1]["rewards/margin"] != 0


@pytest.mark.parametrize("override, message", [
    ("dpo.loss=kto", "dpo.loss"),
    ("dpo.bta=0.1", "did you mean 'beta'"),
    ("dpo.beta=0", "dpo.beta"),
])
def test_dpo_config_errors(override, message, tiny_model_dir, pairs_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", f"model={tiny_model_dir}", "method=dpo",
                 f"data.train={pairs_data / 'train.jsonl'}", f"output_dir={out}", override,
                 "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_smoothing_needs_sigmoid_and_init_adapter_needs_dpo():
    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid loss only"):
        load_config(None, ["method=dpo", "dpo.loss=ipo", "dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="init_adapter is used by method: dpo"):
        load_config(None, ["method=lora", "init_adapter=runs/sft/adapter"])


def test_sft_data_for_dpo_names_the_line(tiny_model_dir, arithmetic_data, tmp_path):
    cfg = load_config(None, [f"model={tiny_model_dir}", "method=dpo", f"output_dir={tmp_path / 'r'}",
                             f"data.train={arithmetic_data / 'train.jsonl'}"])
    with pytest.raises(DataError, match=r"train\.jsonl:1: method dpo needs preference records"):
        dpo.train(cfg, **QUIET)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- replay in the SFT term
def _replay_file(folder, n=6, same=False):
    """A replay file: ``n`` general prompt/completion examples (all the same one with ``same``)."""
    path = folder / "replay.jsonl"
    path.write_text("".join(json.dumps({"prompt": "Name a colour." if same else f"Name colour number {i}.",
                                        "completion": "Blue is a colour." if same else f"Colour {i} is blue."})
                            + "\n" for i in range(n)))
    return path


def test_replay_rows_are_spread_so_each_pass_sees_each_row_once():
    for n_rows, n_micro in ((5, 3), (2, 5), (7, 7), (9, 2)):
        order = dpo.SpreadOrder(n_rows, n_micro, seed=4)
        for epoch in range(2):
            micro = [order.rows(epoch * n_micro + m) for m in range(n_micro)]
            assert sorted(i for rows in micro for i in rows) == list(range(n_rows))
            assert {len(rows) for rows in micro} <= {n_rows // n_micro, -(-n_rows // n_micro)}
        assert order.rows(0) == dpo.SpreadOrder(n_rows, n_micro, seed=4).rows(0)  # resumable


def test_ce_replay_joins_the_sft_term_with_the_base_nll_of_the_replay_answers(
        tiny_model_dir, pairs_data, tmp_path, capsys):
    """Step 1 of a fresh adapter: the policy is the base, so the logged replay loss is the
    base's mean NLL of the replay answers (all replay examples are one example here), and the
    run's log and summary say replay ran."""
    from lorakit.data.tokenize import tokenize_examples
    from lorakit.train.common import supervised_loss
    from lorakit.train.sft import make_batch as sft_batch

    own = _replay_file(tmp_path, same=True)
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", "train.max_steps=1",
               "dpo.sft_weight=0.5", "data.replay.fraction=0.3", f"data.replay.file={own}",
               "data.replay.loss=ce")
    logs = []
    result = dpo.train(cfg, progress=False, log=logs.append)
    record = _records(result.run_dir)[0]
    model, tokenizer, _, _ = dpo.setup_model(cfg, torch.device("cpu"), "fp32")
    from lorakit.data.formats import load_examples

    (row,) = tokenize_examples(load_examples(str(own)).examples[:1], tokenizer, 96, "all_assistant")
    with torch.no_grad():
        nll, n = supervised_loss(model, sft_batch([row], [0], tokenizer.pad_token_id, False, "cpu"))
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert record["replay_loss"] == pytest.approx(float(nll / n), rel=1e-5)
    assert any("replay:" in m and "data.replay.loss=ce" in m for m in logs)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["replay"]["loss"] == "ce" and summary["replay"]["rows"] >= 1
    assert summary["replay"]["final_replay_loss"] == record["replay_loss"]


def _sft_adapter(tiny_model_dir, tmp_path):
    from lorakit.lora.inject import add_adapter
    from lorakit.lora.io import save_adapter
    from lorakit.models.load import load_model

    sft_model, tokenizer = load_model(str(tiny_model_dir), dtype=torch.float32)
    add_adapter(sft_model, load_config(None, ["lora.r=4"]).lora.to_lora_config())
    _randomise_adapter(sft_model, std=0.2, seed=3)
    return save_adapter(sft_model, tmp_path / "sft" / "adapter", tokenizer=tokenizer)


def test_kl_replay_joins_the_sft_term_against_dpos_reference(tiny_model_dir, pairs_data,
                                                              tmp_path, monkeypatch):
    """``data.replay.loss=kl`` in a DPO run from an SFT adapter. Step 1: the replay loss is 0,
    since the policy starts as DPO's reference (base + SFT adapter; matching the plain base
    would not be 0). Step 2's gradient, recomputed by hand from step 2's weights: the DPO
    loss over the pairs, plus sft_weight x (chosen answers' NLL + KL(reference || policy) at
    every replay position, from two whole-model forwards) / (their token count)."""
    from lorakit.train import common as train_common

    sft = _sft_adapter(tiny_model_dir, tmp_path)
    own = _replay_file(tmp_path, n=10)
    cfg = _cfg(tiny_model_dir, pairs_data, tmp_path / "run", "train.max_steps=2",
               "dpo.sft_weight=0.5", "lora.dropout=0.0", f"init_adapter={sft}",
               "data.replay.fraction=0.5", f"data.replay.file={own}", "train.max_grad_norm=null")
    assert cfg.data.replay.loss_for("dpo") == "kl"
    seen, real_step = [], train_common.optimizer_step

    def spy(optimizer, scheduler, clip=None):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        seen.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return real_step(optimizer, scheduler, clip)

    monkeypatch.setattr(train_common, "optimizer_step", spy)
    result = dpo.train(cfg, **QUIET)
    records = [r for r in _records(result.run_dir) if "replay_loss" in r]
    assert records[0]["replay_loss"] == pytest.approx(0.0, abs=1e-7) and records[1]["replay_loss"] > 0

    model, tokenizer, _, has_ref = dpo.setup_model(cfg, torch.device("cpu"), "fp32")
    optimizer, _ = train_common.optimizer_and_scheduler(model, cfg, 2)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weights, grads = seen[1]
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    pairs, _ = dpo.prepare_pairs(cfg, tokenizer, log=lambda m: None)
    order = train_common.DataOrder(len(pairs), 4, 0)
    rows, replay_order = dpo.prepare_replay(cfg, pairs, tokenizer, model, order, lambda m: None)
    assert 1 <= len(replay_order.rows(1)) < len(rows)
    batch = dpo.make_batch(pairs, order.rows(1), tokenizer.pad_token_id, torch.device("cpu"))
    rbatch = dpo.replay_batch(rows, replay_order, 1, tokenizer.pad_token_id, torch.device("cpu"))
    scored = dpo.score_batch(model, batch, None, cfg, "fp32", torch.device("cpu"), has_ref)
    n_chosen = int((batch["labels"][:4, 1:] != -100).sum())
    marked = rbatch["distill"][:, 1:]
    inputs = dict(input_ids=rbatch["input_ids"], attention_mask=rbatch["attention_mask"])
    log_q = torch.log_softmax(model(**inputs).logits.float(), -1)[:, :-1]
    with dpo.reference(model, has_ref):
        log_p = torch.log_softmax(model(**inputs).logits.float(), -1)[:, :-1]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[marked].sum()
    n_sft = n_chosen + int(marked.sum())
    objective = (scored["losses"].sum() / 4
                 + 0.5 * (-scored["chosen_logps"].sum() + kl) / n_sft)
    objective.backward()
    assert float(kl.detach()) > 0
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert records[1]["replay_loss"] == pytest.approx(float(kl) / int(marked.sum()), rel=1e-4)


def test_replay_needs_a_paired_preference_method_or_sft():
    assert load_config(None, ["method=dpo", "data.replay.fraction=0.1"]).data.replay.fraction == 0.1
    assert load_config(None, ["method=orpo", "data.replay.fraction=0.1"]).method == "orpo"
    with pytest.raises(ConfigError, match="method kto has none"):
        load_config(None, ["method=kto", "data.replay.fraction=0.1"])
