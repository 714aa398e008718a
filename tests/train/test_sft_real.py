"""The SFT recipe on the real embedded SmolLM2-135M-Instruct (slow, still run by make test)."""

import pytest
import torch

from lorakit.config import load_config
from lorakit.examples import SQL_DIR
from lorakit.train.sft import evaluate, prepare_rows, setup_model, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sql_slice(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sql")
    train_lines = (SQL_DIR / "train.jsonl").read_text().splitlines()[:120]
    eval_lines = (SQL_DIR / "eval.jsonl").read_text().splitlines()[:12]
    (folder / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(eval_lines) + "\n")
    return folder


def test_sixteen_steps_lower_eval_loss_and_adapter_loads_in_peft(sql_slice, tmp_path):
    from peft import PeftModel

    cfg = load_config(None, [f"data.train={sql_slice / 'train.jsonl'}",
                             f"data.eval={sql_slice / 'eval.jsonl'}", f"output_dir={tmp_path / 'run'}",
                             "data.max_length=160", "train.batch_size=2", "train.max_steps=16",
                             "train.lr=1e-3", "train.precision=fp32",
                             "lora.dropout=0.0"])
    # measured: base 1.22 -> 0.36 after the 16 steps (0.30x; 16 steps at lr 1e-3 replaced 30
    # at 5e-4 and max_length 160 keeps one example a row: the test took ~110 s, now ~60 s)
    # the eval loss of the untouched base (a fresh adapter has B = 0, so it is the base)
    model, tokenizer, _ = setup_model(cfg, torch.device("cpu"), "fp32")
    _, eval_rows, _ = prepare_rows(cfg, tokenizer, log=lambda m: None)
    base_eval = evaluate(model, eval_rows, cfg, tokenizer.pad_token_id, torch.device("cpu"), "fp32")
    del model

    result = train(cfg, progress=False, log=lambda m: None)
    tuned_eval = result.summary["final_eval_loss"]
    assert tuned_eval < 0.5 * base_eval, (base_eval, tuned_eval)

    # the adapter folder is a PEFT adapter: same logits through PEFT and through lorakit
    import lorakit

    ids = tokenizer("Schema: customers(id, name)\nQuestion: How many customers?",
                    return_tensors="pt")["input_ids"]
    ours_model, _ = lorakit.load_model("smollm2-135m-instruct", dtype=torch.float32)
    lorakit.load_adapter(ours_model, result.adapter_dir)
    ours = ours_model(ids).logits
    base_model, _ = lorakit.load_model("smollm2-135m-instruct", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base_model, result.adapter_dir).eval()
    assert (ours - peft_model(ids).logits).abs().max() <= 1e-4
