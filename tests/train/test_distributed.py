"""Several processes (torchrun, gloo on CPU): DDP and FSDP2 train the same adapter as one
process with the same global batch, write the run folder once, and checkpoints move between
1 and 2 processes. Plus the pieces that need no second process: the torchrun command behind
``--nproc``, data positions across world sizes, the device_map placement plan, config keys.

One torchrun launch (2 processes) serves the tiny-model multi-process checks, because starting
processes costs more than the tiny runs themselves; the sharded-load memory checks need fresh
processes of their own (one of them is the real ``lorakit train --nproc 2`` launch).

Tolerance: 1e-5 max abs difference on every adapter tensor (the issue's bound). Each step
sums the same per-token losses in a different order (two half batches, then a gradient
all-reduce), so results agree to float32 rounding, ~1e-8 after 4 steps here.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import adapter_tensors as _adapter
from run_helpers import max_abs_diff as _max_diff
from run_helpers import metrics_records as _records
from run_helpers import rewind

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.errors import ConfigError
from lorakit.train import distributed
from lorakit.train.sft import train

TOL = 1e-5
# the sharded-load memory check: a random Llama of ~40M parameters (160 MB in float32), big
# enough that half of it stands out from allocator noise
MID = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=4, vocab_size=4096)
# the same check for a 4-bit base: wider, so that half of its ~60 MB of 4-bit codes stands
# out beside one float32 MLP matrix (16 MB) and bitsandbytes' temporaries quantizing it
QMID = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=4096)
WORKER = Path(__file__).with_name("_dist_worker.py")
# QLoRA: NF4 base (bitsandbytes, CPU), 2 steps without eval or checkpoints (cheap)
QLORA = ("method=qlora", "train.max_steps=2", "train.save_every=null", "train.eval_every=null")


def _overrides(model_dir, data, out, batch_size, *extra):
    # dropout 0: with dropout each process draws its own masks, so runs agree in distribution
    # only. grad_accum 2: gradients are synchronised on the 2nd micro-step only.
    return [f"model={model_dir}", f"data.train={data / 'train.jsonl'}",
            f"data.eval={data / 'eval.jsonl'}", f"output_dir={out}", "data.max_length=128",
            f"train.batch_size={batch_size}", "train.grad_accum=2", "train.precision=fp32",
            "train.lr=1e-3", "lora.r=4", "lora.alpha=8", "lora.dropout=0", "train.max_steps=4",
            "train.save_every=2", "train.keep_checkpoints=5", "train.eval_every=2", *extra]


def _rewind(src: Path, dst: Path) -> Path:
    """A copy of run ``src`` as it was at step 2 (later checkpoint and final adapter gone)."""
    return rewind(shutil.copytree(src, dst))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, arithmetic_data, tmp_path_factory):
    """A 1-process reference run, then one 2-process launch doing DDP and FSDP runs from
    scratch and resumed from the 1-process run's step-2 checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    single = train(load_config(None, _overrides(tiny_model_dir, arithmetic_data, root / "single", 6)),
                   progress=False, log=lambda m: None)
    qlora = train(load_config(None, _overrides(tiny_model_dir, arithmetic_data, root / "qlora", 6,
                                               *QLORA)), progress=False, log=lambda m: None)
    # data.replay.loss=kl: the replay rows run a second, no-grad forward of the base
    replay_file = root / "replay.jsonl"
    replay_file.write_text("".join(json.dumps({"prompt": f"Name a colour, {i}.", "completion": "Blue."})
                                   + "\n" for i in range(12)))
    kl_replay = ("data.replay.fraction=0.3", f"data.replay.file={replay_file}",
                 "data.replay.loss=kl", *QLORA[1:])
    train(load_config(None, _overrides(tiny_model_dir, arithmetic_data, root / "kl_single", 6,
                                       *kl_replay)), progress=False, log=lambda m: None)
    _rewind(root / "single", root / "single_to_ddp")
    _rewind(root / "single", root / "single_to_fsdp")

    def two_proc(name, *extra):
        return {"name": name,
                "overrides": _overrides(tiny_model_dir, arithmetic_data, root / name, 3, *extra)}

    plan = [two_proc("ddp", "train.report_to=[tensorboard]"),
            two_proc("fsdp", "train.strategy=fsdp"),
            two_proc("single_to_ddp", "resume=true"),
            two_proc("single_to_fsdp", "train.strategy=fsdp", "resume=true"),
            two_proc("qlora_fsdp", *QLORA, "train.strategy=fsdp"),
            two_proc("kl_fsdp", *kl_replay, "train.strategy=fsdp"),
            # rank 1 alone is interrupted / sees a NaN in step 2 (its 3rd micro-batch)
            {**two_proc("stop", "train.max_steps=20"), "rank1_call": 3, "rank1_does": "sigint"},
            {**two_proc("nan", "train.max_steps=20"), "rank1_call": 3, "rank1_does": "nan"}]
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(WORKER), str(root / "plan.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, single, proc.stdout, qlora


@pytest.fixture(scope="module")
def mid_runs(tmp_path_factory):
    """The ~40M-parameter checkpoint trained one step by one process and by two FSDP ranks,
    each in fresh processes run as users run them (`lorakit train`): a resident-size peak is
    only the load's in a process that has not freed memory before it (glibc reuses freed
    pages without growing the resident size), and whose model code is already imported
    (`lorakit train`'s pre-flight builds the model on the meta device first)."""
    root = tmp_path_factory.mktemp("dist-mid")
    mid = _mid_checkpoint(root / "mid-ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "lorakit", "train",
                             *_mid_overrides(mid, root / "single"), "train.batch_size=2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    # as a user types it: the CLI starts torchrun, which starts two `lorakit train` processes
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train",
                           *_mid_overrides(mid, root / "fsdp", "train.strategy=fsdp"),
                           "--nproc", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, mid


@pytest.fixture(scope="module")
def qlora_mid_runs(tmp_path_factory):
    """As ``mid_runs``, QLoRA (NF4) on the QMID checkpoint: one process, then two FSDP ranks."""
    root = tmp_path_factory.mktemp("dist-qmid")
    mid = _mid_checkpoint(root / "qmid-ckpt", QMID, shard_mib=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    single = subprocess.run([sys.executable, "-m", "lorakit", "train",
                             *_mid_overrides(mid, root / "single", "method=qlora"),
                             "train.batch_size=2"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    proc = subprocess.run(distributed.torchrun_command(
        2, ["train", *_mid_overrides(mid, root / "fsdp", "train.strategy=fsdp", "method=qlora")]),
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root, mid


def _mid_checkpoint(path: Path, shape: dict = MID, shard_mib: int = 16) -> dict:
    from checkpoints import llama_config, write_llama_checkpoint

    info = write_llama_checkpoint(path, llama_config(**shape), shard_bytes=shard_mib * 2**20)
    rows = [{"prompt": " ".join(f"w{3 + (i * 7 + j) % 4000}" for j in range(12)),
             "completion": " ".join(f"w{3 + (i * 11 + j) % 4000}" for j in range(6))}
            for i in range(8)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return info


def _mid_overrides(info: dict, out: Path, *extra) -> list[str]:
    return [f"model={info['path']}", f"data.train={info['path'] / 'train.jsonl'}",
            f"output_dir={out}", "data.max_length=64", "train.batch_size=1", "train.grad_accum=1",
            "train.precision=fp32", "lora.r=4", "lora.dropout=0", "train.max_steps=1",
            "train.save_every=null", "train.eval_every=null", "eval.after_train=false", *extra]


def test_ddp_two_processes_equal_one_process_with_double_batch(runs):
    root, single, *_ = runs
    assert _max_diff(_adapter(single.adapter_dir), _adapter(root / "ddp" / "adapter")) <= TOL
    ours, ref = _records(root / "ddp"), _records(single.run_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for key in ("loss", "eval_loss", "grad_norm"):  # eval is sharded and all-reduced too
        mine = [r[key] for r in ours if r.get(key) is not None]
        assert len(mine) >= 2
        assert mine == pytest.approx([r[key] for r in ref if r.get(key) is not None], rel=1e-5)
    # 19 rows in global batches of 6: the 4th micro-batch holds 1 row, so rank 1 had an
    # empty share in step 2 (it ran a row with nothing supervised)
    assert single.summary["train_rows"] % 6 == 1
    summary = json.loads((root / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert summary["supervised_tokens"] == single.summary["supervised_tokens"]


def test_fsdp_two_processes_equal_one_process(runs):
    root, single, *_ = runs
    assert json.loads((root / "fsdp" / "summary.json").read_text())["fsdp_sharded_load"] is True
    assert _max_diff(_adapter(single.adapter_dir), _adapter(root / "fsdp" / "adapter")) <= TOL
    assert [r["loss"] for r in _records(root / "fsdp") if "loss" in r] == pytest.approx(
        [r["loss"] for r in _records(single.run_dir) if "loss" in r], rel=1e-5)


def test_fsdp_ranks_read_only_their_shard_of_the_base(mid_runs):
    """Each FSDP rank's load (model built, adapter added, sharded) adds about half the
    float32 base plus one tensor in flight; one process holding the whole base adds all of
    it. Measured as VmHWM above the resident size before the load (lorakit's summary). The
    two ranks were started as a user starts them, ``lorakit train ... --nproc 2``."""
    root, mid = mid_runs
    summary = json.loads((root / "fsdp" / "summary.json").read_text())
    single = json.loads((root / "single" / "summary.json").read_text())
    assert summary["fsdp_sharded_load"] is True
    fp32_base = mid["parameters"] * 4
    largest = max(s for s in (512 * 4096, 2048 * 512)) * 4  # the head / an MLP matrix
    per_rank = summary["per_rank"]["load_peak_memory_bytes"]
    assert len(per_rank) == 2
    single_load = single["load_peak_memory_bytes"]
    assert single_load >= fp32_base, (single_load, fp32_base)
    for load in per_rank:
        assert load <= fp32_base / 2 + 3 * largest + 24 * 2**20, (per_rank, fp32_base)
        assert load <= 0.75 * single_load, (per_rank, single_load)
    # the sharded run trains what one process trains on the same global batch from the same
    # weights
    assert _max_diff(_adapter(root / "single" / "adapter"), _adapter(root / "fsdp" / "adapter")) <= TOL
    assert summary["world_size"] == 2 and summary["steps"] == single["steps"] == 1
    assert [r["loss"] for r in _records(root / "fsdp") if "loss" in r] == pytest.approx(
        [r["loss"] for r in _records(root / "single") if "loss" in r], rel=1e-5)


def test_fsdp_ranks_hold_only_their_shard_of_a_4bit_base(qlora_mid_runs):
    """A 4-bit base loads sharded too: each rank reads every linear weight (one tensor in
    flight), quantizes it and keeps only its rows of the packed codes. Exact: the weights a
    rank holds (summary ``model_bytes``) are half of what one process holds, and that is the
    4-bit model, not a dense one. Measured: the load's peak, where a rank holding the whole
    4-bit base would peak at one process's load or above (the same reads plus FSDP's own);
    here one process +183-191 MiB, each rank +156-160 MiB, the model 90 MiB."""
    root, _ = qlora_mid_runs
    summary = json.loads((root / "fsdp" / "summary.json").read_text())
    single = json.loads((root / "single" / "summary.json").read_text())
    assert summary["fsdp_sharded_load"] is True
    h, i, v, n = (QMID[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                    "num_hidden_layers"))
    kv = h // QMID["num_attention_heads"] * QMID["num_key_value_heads"]
    codes = n * (2 * h * h + 2 * h * kv + 3 * h * i) // 2  # 4 bits a weight
    model_bytes = codes + 2 * v * h * 4  # + the float32 embedding and head
    # one process holds the 4-bit model (+ norms and the r=4 adapter: 3%), not a dense one
    assert model_bytes <= single["model_bytes"] <= 1.05 * model_bytes, (single, model_bytes)
    held = summary["per_rank"]["model_bytes"]
    assert len(held) == 2
    for rank_bytes in held:  # its half of every tensor (rows padded to split evenly)
        assert 0.49 * single["model_bytes"] <= rank_bytes <= 0.51 * single["model_bytes"], held
    single_load = single["load_peak_memory_bytes"]
    assert single_load >= model_bytes, (single_load, model_bytes)
    per_rank = summary["per_rank"]["load_peak_memory_bytes"]
    for load in per_rank:  # half the model saved; ask for a quarter of that, above the noise
        assert load <= single_load - model_bytes / 8, (per_rank, single_load, model_bytes)
    assert json.loads((root / "fsdp" / "adapter" / "lorakit.json").read_text())[
        "quantization"]["type"] == "nf4"
    assert _max_diff(_adapter(root / "single" / "adapter"), _adapter(root / "fsdp" / "adapter")) <= TOL


def test_qlora_fsdp_shards_the_4bit_base_and_equals_one_process(runs):
    root, _, _, qlora = runs
    # the ranks read their shard of the 4-bit base only (materialize_sharded)
    assert json.loads((root / "qlora_fsdp" / "summary.json").read_text())[
        "fsdp_sharded_load"] is True
    assert json.loads((root / "qlora_fsdp" / "adapter" / "lorakit.json").read_text())[
        "quantization"]["type"] == "nf4"
    assert _max_diff(_adapter(qlora.adapter_dir), _adapter(root / "qlora_fsdp" / "adapter")) <= TOL


def test_kl_replay_under_fsdp_equals_one_process(runs):
    """With data.replay.loss=kl some ranks' shares hold a replay row and others' do not;
    every rank still runs the base's forward (FSDP all-gathers in each), so none waits
    forever, and the run trains what one process trains."""
    root, *_ = runs
    rows = [r for r in _records(root / "kl_fsdp") if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(
        [r["loss"] for r in _records(root / "kl_single") if "loss" in r], rel=1e-5)
    assert _max_diff(_adapter(root / "kl_single" / "adapter"), _adapter(root / "kl_fsdp" / "adapter")) <= TOL


def test_a_stop_or_nan_on_one_rank_stops_both_at_the_same_step(runs):
    root, _, stdout, *_ = runs
    assert "[interrupted rank0] stop" in stdout and "[interrupted rank1] stop" in stdout
    assert [p.name for p in (root / "stop" / "checkpoints").iterdir()] == ["step-2"]
    assert not (root / "stop" / "adapter").exists()
    assert "Continue with resume=true" in stdout
    for rank in (0, 1):  # rank 0's own loss was finite; it stops on the all-reduced one
        assert f"[error rank{rank}] nan: loss became nan at step 2" in stdout
    assert not (root / "nan" / "adapter").exists()


def test_only_rank_zero_writes_and_logs(runs):
    root, _, stdout, *_ = runs
    run = root / "ddp"
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one writer: no line twice
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # a second rank would open its own events file
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert "[rank0] lora on" in stdout and "[rank1]" not in stdout
    assert stdout.count("[done rank1]") == 6  # rank 1 did take part in every run that ends


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_holds_every_shard(runs, strategy):
    """The checkpoint's optimizer moments have the full parameter shapes (an FSDP rank holds
    half the rows of each), and its adapter equals the final one's layout."""
    root, single, *_ = runs
    ckpt = root / strategy / "checkpoints" / "step-2"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    adapter = _adapter(ckpt / "adapter")
    shapes = sorted(tuple(v.shape) for v in adapter.values())
    moments = sorted(tuple(s["exp_avg"].shape) for s in state["optimizer"]["state"].values())
    assert moments == shapes
    reference = _adapter(single.run_dir / "checkpoints" / "step-2" / "adapter")
    assert _max_diff(adapter, reference) <= TOL


@pytest.mark.parametrize("name", ["single_to_ddp", "single_to_fsdp"])
def test_one_process_checkpoint_resumes_with_two(runs, name):
    root, single, stdout, *_ = runs
    assert "resumed from" in stdout
    assert _max_diff(_adapter(single.adapter_dir), _adapter(root / name / "adapter")) <= TOL
    assert [r["step"] for r in _records(root / name) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_with_one(runs, strategy, tiny_model_dir, arithmetic_data):
    root, single, *_ = runs
    rewound = _rewind(root / strategy, root / f"{strategy}_to_single")
    cfg = load_config(None, _overrides(tiny_model_dir, arithmetic_data, rewound, 6, "resume=true"))
    resumed = train(cfg, progress=False, log=lambda m: None)
    assert resumed.summary["steps"] == 4 and resumed.summary["world_size"] == 1
    assert _max_diff(_adapter(single.adapter_dir), _adapter(resumed.adapter_dir)) <= TOL


# ---------------------------------------------------------------------- no second process
def test_nproc_validates_then_runs_torchrun_without_nproc(tiny_model_dir, arithmetic_data, tmp_path,
                                                         monkeypatch, capsys):
    calls = []

    class FakeTorchrun:  # records the command instead of starting processes
        def __init__(self, cmd, env, start_new_session):
            calls.append(cmd)
            self.pid = 0

        def wait(self):
            return 0

    monkeypatch.setattr(distributed.subprocess, "Popen", FakeTorchrun)
    config = tmp_path / "run.yaml"
    config.write_text(load_config(None, _overrides(tiny_model_dir, arithmetic_data,
                                                   tmp_path / "run", 2)).to_yaml())
    assert main(["train", str(config), "train.lr=1e-4", "--nproc", "2", "--no-progress"]) == 0
    (cmd,) = calls
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd
    at = cmd.index("lorakit")
    assert cmd[at - 1] == "-m"
    assert cmd[at + 1:] == ["train", str(config), "train.lr=1e-4", "--no-progress"]  # no --nproc
    # a bad config fails here, before any process starts
    assert main(["train", str(config), "train.lrr=1", "--nproc", "2"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err and len(calls) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("micro, n_rows, old, new, expected", [
    (3, 10, 4, 4, (3, True)),    # same global batch: unchanged
    (2, 16, 4, 8, (1, True)),    # 8 rows seen = 1 micro-batch of 8
    (6, 16, 4, 8, (3, True)),    # epoch 1 (4 micro of 4 each), 8 rows in: 2 + 1
    (1, 16, 4, 8, (1, False)),   # 4 rows seen: not a boundary of 8, rounded up
    (5, 16, 4, 8, (3, False)),   # epoch 1, 4 rows in: rounded up as well
    (3, 10, 4, 2, (5, True)),    # epoch 0 has 3 micro of 4 (4+4+2) -> epoch 1 starts at 5
])
def test_convert_position(micro, n_rows, old, new, expected):
    assert distributed.convert_position(micro, n_rows, old, new) == expected


def test_shard_splits_a_global_batch_contiguously():
    d0, d1 = (distributed.Dist(rank=r, world_size=2) for r in (0, 1))
    assert (d0.shard([7, 3, 9, 1]), d1.shard([7, 3, 9, 1])) == ([7, 3], [9, 1])
    assert (d0.shard([5]), d1.shard([5])) == ([5], [])  # the short last batch of an epoch


def _meta_llama(layers=4):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def _bytes_per_device(model, plan, bytes_per_value=4):
    sizes = {}
    for name, p in model.named_parameters():
        owner = max((m for m in plan if name.startswith(m + ".") or m == ""), key=len)
        sizes[plan[owner]] = sizes.get(plan[owner], 0) + p.numel() * bytes_per_value
    return sizes


@pytest.mark.parametrize("budget", [700_000, 1_000_000])
def test_device_map_plan_keeps_blocks_whole_in_order_within_budget(budget):
    model = _meta_llama()
    plan = distributed.placement_plan(model, {0: budget, 1: budget, "cpu": 10**9})
    layers = [plan[f"model.layers.{i}"] for i in range(4)]  # each block placed whole
    assert set(layers) == {0, 1} and layers == sorted(layers)  # pipeline order, both GPUs used
    for device, used in _bytes_per_device(model, plan).items():
        if device != "cpu":
            assert used <= budget
    # a model that fits the first GPU stays there whole
    assert distributed.placement_plan(model, {0: 10**7, 1: 10**7, "cpu": 10**9}) == {"": 0}


def test_device_map_plan_spills_to_cpu_when_gpus_are_full():
    plan = distributed.placement_plan(_meta_llama(), {0: 400_000, 1: 400_000, "cpu": 10**9})
    assert "cpu" in plan.values()


def test_model_device_map_config_round_trip(tmp_path):
    cfg = load_config(None, ["model=some/model", "model.device_map=auto", "train.strategy=fsdp"])
    assert (cfg.model, cfg.device_map, cfg.train.strategy) == ("some/model", "auto", "fsdp")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert (again.model, again.device_map) == ("some/model", "auto")
    assert load_config(path, ["model=other/model"]).device_map == "auto"
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: some/model\n")
    assert load_config(plain, ["model.device_map=auto"]).model == "some/model"
    assert load_config(plain).device_map is None
    with pytest.raises(ConfigError, match="did you mean 'device_map'"):
        load_config(None, ["model.devicemap=auto"])
    with pytest.raises(ConfigError, match="strategy"):
        load_config(None, ["train.strategy=zero3"])


def test_incompatible_combinations_are_config_errors():
    two = distributed.Dist(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="device_map"):
        distributed.check_compatible(load_config(None, ["model.device_map=auto"]), two)
    fsdp = distributed.Dist(rank=0, world_size=2, strategy="fsdp")
    with pytest.raises(ConfigError, match="method=full"):
        distributed.check_compatible(load_config(None, ["method=full"]), fsdp)
