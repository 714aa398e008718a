"""LoRA training-step throughput on the embedded SmolLM2-135M, side by side in one process:
fp32 vs a bf16 frozen base (with and without bf16 autocast), and LoRA dropout 0 vs 0.05
(lorakit's shared, int16-coded mask vs PEFT's ``nn.Dropout``, one Bernoulli mask per module).

Each round runs one forward + backward + AdamW step of every variant on the same packed rows
of the bundled SQL example (max_length 256), variants interleaved so that a loaded machine
slows them alike; the first round is warm-up, the median of the others is reported. Also
prints the measured fp32 and bf16 matmul peaks and each variant's model FLOP utilisation,
``4 x parameters x tokens/s`` (the frozen base gets no weight gradients) over the bf16 peak. This is what
``train.precision: auto`` is based on (docs/benchmarks.md, "Precision and dropout").

Each variant's speed-up is against the fp32 variant with the same dropout, so the bf16 gain is
reported at ``lora.dropout`` 0.05 (the default users run, marked ``*``) beside dropout 0.

    .venv/bin/python bench/bench_precision.py [--rows 2] [--rounds 3] [--variants fp32,bf16,...]
    .venv/bin/python bench/bench_precision.py --qlora      # the same over a 4-bit base
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (precision of the base, autocast?, dropout, dropout kind)
VARIANTS = {
    "fp32": ("fp32", False, 0.0, None),
    "fp32-drop": ("fp32", False, 0.05, "lorakit"),
    "fp32-drop-peft": ("fp32", False, 0.05, "peft"),
    "bf16": ("bf16", False, 0.0, None),
    "bf16-drop": ("bf16", False, 0.05, "lorakit"),
    "bf16-autocast": ("bf16", True, 0.0, None),
}


def matmul_peak(dtype, n=2048, reps=5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _set_dropout(model, p: float, kind: str | None) -> None:
    from torch import nn

    from lorakit.lora.layers import LoraDropout, lora_layers

    for _, layer in lora_layers(model):
        for name in layer.lora_dropout:
            layer.lora_dropout[name] = (nn.Identity() if not p else LoraDropout(p) if kind == "lorakit"
                                        else nn.Dropout(p))


def main(argv=None) -> None:
    from lorakit.config import load_config
    from lorakit.examples import SQL_DIR
    from lorakit.train.common import autocast, build_optimizer, supervised_loss
    from lorakit.train.sft import make_batch, prepare_rows, setup_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2, help="packed rows of 256 tokens per step")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (the first is warm-up)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes)")
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    names = args.variants.split(",")
    extra = ["quantization.type=nf4"] if args.qlora else []
    models, optims = {}, {}
    for prec in sorted({VARIANTS[n][0] for n in names}):
        cfg = load_config(None, [f"data.train={SQL_DIR / 'train.jsonl'}", "data.max_length=256",
                                 "lora.dropout=0.05", "data.packing=true",
                                 *(["method=qlora"] + extra if args.qlora else [])])
        model, tok, counts = setup_model(cfg, device, prec)
        models[prec] = model
        optims[prec] = build_optimizer(model, 2e-4, 0.0)
    rows, _, _ = prepare_rows(cfg, tok, lambda m: None)
    params = counts["total"]
    times = {n: [] for n in names}
    for rnd in range(args.rounds):
        batch = make_batch(rows, list(range(rnd * args.rows, (rnd + 1) * args.rows)),
                           tok.pad_token_id, True, device)
        for n in names:
            prec, use_autocast, p, kind = VARIANTS[n]
            model, opt = models[prec], optims[prec]
            _set_dropout(model, p, kind)
            ctx = autocast("bf16", device) if use_autocast else contextlib.nullcontext()

            def step():
                with ctx:
                    loss, count = supervised_loss(model, batch)
                (loss / count).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            times[n].append(_timed(step))
    tokens = args.rows * 256
    peak16, peak32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"matmul peak 2048^3: bf16 {peak16 / 1e9:.0f} GFLOP/s, fp32 {peak32 / 1e9:.0f} GFLOP/s; "
          f"{params / 1e6:.0f}M parameters, {tokens} tokens per step"
          + (", 4-bit base" if args.qlora else ""))
    median = {n: statistics.median(times[n][1:]) for n in names}
    for n in names:
        t, (_, _, p, kind) = median[n], VARIANTS[n]
        # the fp32 variant with the same dropout, else the first one run
        ref = next((m for m in names if VARIANTS[m][0] == "fp32" and not VARIANTS[m][1]
                    and VARIANTS[m][2:] == (p, kind)), names[0])
        rate = tokens / t
        default = "*" if p == 0.05 and kind == "lorakit" else " "
        print(f"{n:15s}{default}dropout {p:<4g} {t:6.2f} s/step  {rate:7.0f} tokens/s  "
              f"x{median[ref] / t:4.2f} vs {ref:15s} MFU {4 * params * rate / peak16:5.1%} of "
              f"bf16 peak  (steps: {', '.join(f'{x:.2f}' for x in times[n])})")
    print("* lora.dropout 0.05, the default users run")


if __name__ == "__main__":
    main()
