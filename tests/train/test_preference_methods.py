"""method: orpo | simpo | kto through the preference recipe (lorakit/train/dpo.py) on a tiny
model: a few steps move the metrics the expected way, the run folder matches DPO's, KTO's
data format is validated by `lorakit data check`, resume is exact, and bad settings are
config errors. The losses themselves are checked against TRL in test_preference_losses.py."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import adapter_tensors, max_abs_diff, rewind
from run_helpers import metrics_records as _records

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.data.formats import load_examples
from lorakit.errors import ConfigError, DataError
from lorakit.train import dpo

EXAMPLE = Path(dpo.__file__).parents[1] / "examples" / "json_pref"
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    """12 train / 4 eval pairs of the bundled example, and the same answers as KTO records
    (chosen -> label true, rejected -> label false), half of them in the messages form."""
    folder = tmp_path_factory.mktemp("prefs")
    rows = [json.loads(l) for l in (EXAMPLE / "train.jsonl").read_text().splitlines()[:16]]
    for name, part in (("train", rows[:12]), ("eval", rows[12:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        kto = []
        for i, r in enumerate(part):
            for answer, label in ((r["chosen"], True), (r["rejected"], False)):
                if i % 2:
                    kto.append({"messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": answer}],
                                "label": label})
                else:
                    kto.append({"prompt": r["prompt"], "completion": answer, "label": label})
        (folder / f"{name}_kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    return folder


def _cfg(model_dir, data, out, method, *extra, kto=False):
    suffix = "_kto" if kto else ""
    return load_config(None, [f"model={model_dir}", f"method={method}",
                              f"data.train={data / f'train{suffix}.jsonl'}",
                              f"data.eval={data / f'eval{suffix}.jsonl'}",
                              f"output_dir={out}", "data.max_length=96", "train.batch_size=4",
                              "train.precision=fp32", "train.lr=3e-3", "lora.r=4",
                              "lora.alpha=8", "train.warmup=0", "train.scheduler=constant",
                              *extra])


@pytest.mark.parametrize("method, extra", [
    ("orpo", ("dpo.beta=0.5",)),
    ("simpo", ("dpo.beta=2.0", "dpo.simpo_gamma=0.5")),
])
def test_reference_free_methods_learn_and_write_dpos_run_folder(method, extra, tiny_model_dir,
                                                                pref_data, tmp_path):
    steps = ("train.max_steps=6", "train.eval_every=3")
    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "run", method, *steps, *extra)
    result = dpo.train(cfg, **QUIET)
    records = _records(result.run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
                "rewards/margin", "logps/chosen", "logps/rejected", "lr", "grad_norm"):
        assert all(key in r for r in records), key
    # reference-free: the rewards are beta x the mean answer log-prob, not 0 at step 0
    assert records[0]["rewards/chosen"] != 0
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["eval_loss"] < records[2]["eval_loss"]
    assert records[-1]["eval_rewards/margin"] > records[2]["eval_rewards/margin"]
    assert records[-1]["rewards/margin"] > records[0]["rewards/margin"]
    if method == "orpo":  # ORPO's loss = the chosen answers' NLL + the odds-ratio term
        for r in records:
            assert r["nll_loss"] > 0 and r["loss"] > r["nll_loss"]
            assert r["log_odds_ratio"] < 0
            assert r["loss"] == pytest.approx(r["nll_loss"] - 0.5 * r["log_odds_ratio"],
                                              rel=1e-5)
        assert records[-1]["log_odds_chosen"] > records[0]["log_odds_chosen"]
    for name in ("config.yaml", "adapter/adapter_model.safetensors", "loss.png", "rewards.png",
                 "reward_accuracy.png", "summary.json"):
        assert (result.run_dir / name).is_file(), name
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["method"] == method and summary["reference"] == "none (reference-free)"
    manifest = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert manifest["method"] == method
    written = load_config(result.run_dir / "config.yaml")
    assert written.method == method and not written.quantized


def test_kto_learns_and_resumes_exactly(tiny_model_dir, pref_data, tmp_path):
    extra = ("dpo.beta=0.5", "train.max_steps=4", "train.eval_every=2", "train.save_every=2",
             "train.keep_checkpoints=5")
    straight = dpo.train(_cfg(tiny_model_dir, pref_data, tmp_path / "a", "kto", *extra,
                              kto=True), **QUIET)
    records = _records(straight.run_dir)
    # a fresh adapter is the reference: every log-ratio, reward and the KL estimate are 0,
    # so each example's loss is 1 - sigmoid(0) = 0.5
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-7)
    assert records[0]["rewards/chosen"] == 0 and records[0]["kl"] == 0
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "eval_kl", "eval_rewards/margin"):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["rewards/margin"] > 0
    assert records[3]["eval_rewards/margin"] > records[1]["eval_rewards/margin"] > 0
    assert records[-1]["rewards/accuracy"] > 0.5
    summary = json.loads((straight.run_dir / "summary.json").read_text())
    assert summary["method"] == "kto" and summary["train_pairs"] == 24
    # resumed from step 2 in a fresh process state: the same adapter as straight through
    rewind(shutil.copytree(tmp_path / "a", tmp_path / "b"))
    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "b", "kto", *extra, kto=True)
    resumed = dpo.train(cfg.model_copy(update={"resume": True}), **QUIET)
    assert max_abs_diff(adapter_tensors(straight.adapter_dir),
                        adapter_tensors(resumed.adapter_dir)) <= 1e-6
    assert [r["loss"] for r in _records(resumed.run_dir)] == pytest.approx(
        [r["loss"] for r in records], abs=1e-6)


def test_kto_batches_hold_the_mismatched_pairs(tiny_model_dir, pref_data, tmp_path):
    from lorakit.data.kto import tokenize_kto

    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "r", "kto", kto=True)
    model, tokenizer, _, _ = dpo.setup_model(cfg, torch.device("cpu"), "fp32")
    items, dropped = tokenize_kto(load_examples(cfg.data.train).examples, tokenizer, 96)
    assert not dropped and len(items) == 24 and sum(it["label"] for it in items) == 12
    batch = dpo.make_batch(items, [0, 1, 2], tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["input_ids"].shape[0] == 6 and batch["label"].tolist() == [True, False, True]
    # row 3 + i is prompt i with answer i - 1 (row 3: prompt 0 + answer 2)
    for i, j in ((0, 2), (1, 0), (2, 1)):
        ids = items[i]["prompt_ids"] + items[j]["answer_ids"]
        assert batch["input_ids"][3 + i, :len(ids)].tolist() == ids
        answer = batch["labels"][3 + i][batch["labels"][3 + i] != -100].tolist()
        assert answer == [t for t in items[j]["answer_labels"] if t != -100]


def test_kto_format_and_data_check(pref_data, tmp_path, capsys):
    result = load_examples(pref_data / "train_kto.jsonl")
    assert result.formats == {"kto": 24} and not result.errors
    assert [ex.label for ex in result.examples[:2]] == [True, False]
    assert result.examples[0].messages[-1]["role"] == "assistant"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n'
                   '{"prompt": "a", "completion": "b", "label": true}\n'
                   '{"messages": [{"role": "user", "content": "q"}], "label": false}\n')
    assert main(["data", "check", str(bad), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fields = {(e["line"], e["field"]) for e in report["errors"]}
    assert (1, "label") in fields and (3, "messages") in fields
    assert report["kto_labels"] == {"desirable": 1, "undesirable": 0}
    assert any("no undesirable" in w for w in report["warnings"])


@pytest.mark.parametrize("overrides, message", [
    (["method=orpo", "dpo.precompute_reference=true"], "has no reference model"),
    (["method=kto", "dpo.precompute_reference=true"], "mismatched pairs"),
    (["method=orpo", "dpo.sft_weight=1"], "always adds the chosen answers' NLL"),
    (["method=kto", "dpo.loss=ipo"], "dpo.loss chooses DPO's loss"),
    (["method=kto", "dpo.label_smoothing=0.1"], "label_smoothing applies to method dpo and simpo"),
    (["method=kto", "dpo.desirable_weight=0"], "desirable_weight"),
    (["method=simpo", "dpo.simpo_gamma=-1"], "simpo_gamma"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_pairs_for_kto_and_kto_records_for_orpo_name_the_line(tiny_model_dir, pref_data,
                                                              tmp_path):
    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "r", "kto")  # pair files
    with pytest.raises(DataError, match=r"train\.jsonl:1: method kto needs records with a label"):
        dpo.train(cfg, **QUIET)
    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "r", "orpo", kto=True)
    with pytest.raises(DataError, match=r"train_kto\.jsonl:1: method dpo needs preference"):
        dpo.train(cfg, **QUIET)
    with pytest.raises(ConfigError, match="train.batch_size to 2"):
        dpo.train(_cfg(tiny_model_dir, pref_data, tmp_path / "r", "kto", "train.batch_size=1",
                       kto=True), **QUIET)
    assert not (tmp_path / "r").exists()


def test_cli_dispatches_the_new_methods(tiny_model_dir, pref_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", f"model={tiny_model_dir}", "method=simpo",
                 f"data.train={pref_data / 'train.jsonl'}", f"output_dir={out}",
                 "train.max_steps=1", "data.max_length=96", "train.precision=fp32",
                 "eval.after_train=false", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "simpo"
    assert math.isfinite(_records(out)[0]["loss"])
