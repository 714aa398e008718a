"""`lora.init` through `lorakit train`: a PiSSA run's saved adapter is for the original base."""

import json

from safetensors.torch import load_file

from lorakit.cli import main


def _args(tiny_model_dir, data, out, *extra):
    return ["train", f"model={tiny_model_dir}", f"data.train={data / 'train.jsonl'}",
            f"data.eval={data / 'eval.jsonl'}", f"output_dir={out}", "data.max_length=128",
            "train.batch_size=4", "train.precision=fp32", "train.lr=1e-2", "lora.r=4",
            "lora.alpha=8", "lora.dropout=0", "train.max_steps=4", "eval.metric=exact",
            "eval.sql_db=null", "eval.limit=null", "eval.max_new_tokens=2", "eval.forgetting=false",
            "--no-progress", *extra]


def test_pissa_run_saves_an_adapter_for_the_original_base(tiny_model_dir, arithmetic_data,
                                                          tmp_path, capsys):
    """The run trains on the residual base; its adapter/ (converted, rank 2r) scored by the
    after-train eval on a freshly loaded original base has the run's own final eval loss."""
    run = tmp_path / "pissa"
    assert main(_args(tiny_model_dir, arithmetic_data, run, "lora.init=pissa")) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(t.shape[0] == 8 for k, t in weights.items() if "lora_A" in k)
    result = json.loads((run / "eval" / "results.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert abs(result["models"]["pissa"]["loss"] - summary["final_eval_loss"]) < 1e-4
    assert abs(result["models"]["base"]["loss"] - summary["final_eval_loss"]) > 1e-3
    capsys.readouterr()
