"""QLoRA on the embedded default model: memory to load it, bytes of its weights, step times.

    .venv/bin/python bench/bench_quantize.py            # prints a Markdown table + JSON

Each load runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is its own. Step times
compare LoRA over the float32 base with QLoRA over the NF4 base, same adapter, same batch.
Numbers go into docs/qlora.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MODEL = "smollm2-135m-instruct"
CASES = {  # name -> (load dtype, quantization settings or None)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "nf4+dq (from fp32)": ("float32", dict(quant_type="nf4", double_quant=True)),
    "nf4 (from fp32)": ("float32", dict(quant_type="nf4", double_quant=False)),
    "nf4+dq (from bf16)": ("bfloat16", dict(quant_type="nf4", double_quant=True)),
    "fp4+dq (from fp32)": ("float32", dict(quant_type="fp4", double_quant=True)),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_case(name: str) -> dict:
    """Load the model as ``name`` says (in this process) and report memory and bytes."""
    import gc
    import resource

    import torch

    from lorakit.models.load import load_model
    from lorakit.models.quantize import quantize_model, quantized_weight_bytes

    dtype, quant = CASES[name]
    baseline = _rss_mib()  # python + torch + transformers, before any weight
    t0 = time.perf_counter()
    model, _ = load_model(MODEL, dtype=dtype)
    if quant:
        quantize_model(model, **quant)
    with torch.no_grad():  # touch every weight: memory-mapped pages count once read
        model(torch.arange(100, 132).unsqueeze(0))
    gc.collect()
    seconds = time.perf_counter() - t0
    stats = quantized_weight_bytes(model)
    dense_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()
                                                              }.values()) if not quant else None
    return {"case": name, "load_s": round(seconds, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_mib": round(_rss_mib(), 1), "rss_before_mib": round(baseline, 1),
            "weight_bytes": stats["total_bytes"] if quant else dense_bytes,
            "quantized": {k: stats[k] for k in ("quantized_bytes", "quantized_params",
                                                "bits_per_param", "bits_per_param_without_maps",
                                                "ratio_vs_bf16", "other_bytes")} if quant else None,
            "torch_threads": torch.get_num_threads()}


def step_times(steps: int = 10, batch: int = 2, seq: int = 64) -> dict:
    """Median seconds per optimizer step of LoRA (fp32 base) and QLoRA (NF4+DQ base)."""
    import copy
    import statistics

    import torch

    import lorakit
    from lorakit.models.load import load_model
    from lorakit.models.quantize import quantize_model

    base, _ = load_model(MODEL, dtype="float32")
    ids = torch.randint(100, 10000, (batch, seq), generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("lora", "qlora"):
        model = copy.deepcopy(base)
        if name == "qlora":
            quantize_model(model)
        torch.manual_seed(0)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        times, losses = [], []
        for _ in range(steps + 2):  # two warm-up steps
            t = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            losses.append(round(loss.item(), 4))
        out[name] = {"median_step_s": round(statistics.median(times[2:]), 4),
                     "first_loss": losses[0], "last_loss": losses[-1]}
        del model, opt
    out["qlora_over_lora"] = round(out["qlora"]["median_step_s"] / out["lora"]["median_step_s"], 2)
    out["batch"], out["seq"] = batch, seq
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(load_case(sys.argv[2])))
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for name in CASES:
        proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                              text=True, env=env, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    steps = step_times()
    bf16 = next(r for r in rows if r["case"] == "bf16")
    print("| load | peak RSS MiB | RSS after MiB | weight MiB | quantized-layer bits/param "
          "(w/o maps) | quantized / bf16 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        q = r["quantized"]
        bits = f"{q['bits_per_param']:.3f} ({q['bits_per_param_without_maps']:.3f})" if q else "-"
        ratio = f"{q['ratio_vs_bf16']:.3f}" if q else "-"
        print(f"| {r['case']} | {r['peak_rss_mib']} | {r['rss_after_mib']} | "
              f"{r['weight_bytes'] / 2**20:.1f} | {bits} | {ratio} |")
    print(f"\nbf16 total weights: {bf16['weight_bytes'] / 2**20:.1f} MiB")
    print(f"step time (batch {steps['batch']} x {steps['seq']} tokens, r=16 all-linear, CPU "
          f"{os.cpu_count()} cores): LoRA {steps['lora']['median_step_s']} s, QLoRA "
          f"{steps['qlora']['median_step_s']} s (x{steps['qlora_over_lora']})")
    print(json.dumps({"loads": rows, "steps": steps}, indent=1))


if __name__ == "__main__":
    main()
