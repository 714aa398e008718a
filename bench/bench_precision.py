"""Training-step throughput of LoRA on the embedded SmolLM2-135M: fp32 vs bf16 autocast.

One forward + backward of 8 packed rows (max_length 256) of the bundled SQL example, four
consecutive steps (the first includes warm-up), tokens/s. This is what `precision: auto`
(fp32 on CPUs) is based on.

    .venv/bin/python bench/bench_precision.py [fp32 bf16]
"""

import sys
import time

import torch

from lorakit.config import load_config
from lorakit.examples import SQL_DIR
from lorakit.train.common import autocast, supervised_loss
from lorakit.train.sft import make_batch, prepare_rows, setup_model


def main(precisions):
    device = torch.device("cpu")
    for prec in precisions:
        cfg = load_config(None, [f"data.train={SQL_DIR / 'train.jsonl'}", "train.batch_size=8",
                                 "data.max_length=256", "lora.dropout=0.0"])
        model, tok, _ = setup_model(cfg, device, prec)
        rows, _, _ = prepare_rows(cfg, tok, lambda m: None)
        rates = []
        for it in range(4):
            batch = make_batch(rows, list(range(it * 8, (it + 1) * 8)), tok.pad_token_id, True, device)
            start = time.perf_counter()
            with autocast(prec, device):
                loss, n = supervised_loss(model, batch)
            (loss / n).backward()
            rates.append(batch["input_ids"].numel() / (time.perf_counter() - start))
        print(f"{prec}: tokens/s per step " + ", ".join(f"{r:.0f}" for r in rates))


if __name__ == "__main__":
    main(sys.argv[1:] or ["fp32", "bf16"])
