"""Mixed-adapter serving throughput, and adapter hot-load time.

Three ways to answer 8 concurrent requests, each generating exactly --tokens tokens:

* mixed:  lorakit's engine, 8 requests on 8 different adapters (one batched forward per step);
* single: lorakit's engine, 8 requests on one adapter (the best case for batching);
* naive:  a PEFT model holding the same 8 adapters, ``set_adapter`` per request, one request
          at a time, greedy with a KV cache (what you write without a server).

Targets (issue #9): mixed >= 0.7x single, mixed >= 3x naive. Also times hot-loading an r=16
all-linear adapter into the running engine.

    .venv/bin/python bench/serve_mixed.py [--model smollm2-135m-instruct] [--tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def make_adapters(model, tokenizer, folder: Path, count: int, r: int) -> list[Path]:
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import add_adapter, delete_adapter
    from lorakit.lora.io import save_adapter

    paths = []
    for i in range(count):
        add_adapter(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"), "tmp")
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".lora_B.tmp" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 1e-3)
        paths.append(save_adapter(model, folder / f"ad{i}", "tmp", tokenizer=tokenizer))
        delete_adapter(model, "tmp")
    return paths


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": f"Write a story about "
                                              f"a lighthouse keeper, number {i}."}],
                                            add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def engine_throughput(engine, prompts, adapters, tokens: int) -> dict:
    from lorakit.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[0], adapters[0], SamplingParams(max_tokens=2, temperature=0))  # warm
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda pa: engine.generate(pa[0], pa[1], params),
                                zip(prompts, adapters)))
    wall = time.perf_counter() - start
    generated = sum(r["completion_tokens"] for r in results)
    return {"tokens": generated, "seconds": round(wall, 2), "tokens_per_s": round(generated / wall, 1)}


def naive_throughput(base, paths, prompts, tokens: int, use_generate: bool = False) -> dict:
    """PEFT model with every adapter loaded; per request: set_adapter, then greedy decoding of
    that one request with a KV cache (a plain forward loop; with ``use_generate``,
    transformers' ``generate``, which measured much slower here, see docs/benchmarks.md)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="ad0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"ad{i}")
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        generated = 0
        for i, ids in enumerate(prompts):
            model.set_adapter(f"ad{i % len(paths)}")
            x = torch.tensor([ids])
            if use_generate:
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                     do_sample=False, max_new_tokens=tokens,
                                     min_new_tokens=tokens, pad_token_id=0)
                generated += out.shape[1] - x.shape[1]
                continue
            out = model(input_ids=x, use_cache=True)
            for _ in range(tokens):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                generated += 1
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        wall = time.perf_counter() - start
    return {"tokens": generated, "seconds": round(wall, 2), "tokens_per_s": round(generated / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--naive-generate", action="store_true",
                        help="naive baseline with transformers' generate instead of a plain loop")
    args = parser.parse_args()

    from lorakit.models.load import load_model
    from lorakit.serve.engine import Engine

    base, tokenizer = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, tokenizer, Path(tmp), args.requests + 1, args.rank)
        prompts = prompts_for(tokenizer, args.requests)
        engine = Engine(copy.deepcopy(base), tokenizer, base_name=args.model,
                        max_loaded_adapters=args.requests + 1, max_batch_size=args.requests).start()
        for i, path in enumerate(paths[:-1]):
            engine.add_adapter(f"ad{i}", path)
        mixed = engine_throughput(engine, prompts, [f"ad{i}" for i in range(args.requests)],
                                  args.tokens)
        single = engine_throughput(engine, prompts, ["ad0"] * args.requests, args.tokens)
        start = time.perf_counter()
        engine.add_adapter("hot", paths[-1])  # read + check + install while the engine runs
        hot_load = time.perf_counter() - start
        engine.stop()
        naive = naive_throughput(base, paths[:-1], prompts, args.tokens, args.naive_generate)
    report = {
        "model": args.model, "device": str(next(base.parameters()).device),
        "torch_threads": torch.get_num_threads(), "requests": args.requests,
        "tokens_per_request": args.tokens, "adapter_rank": args.rank,
        "naive_uses_generate": args.naive_generate,
        "mixed_8_adapters": mixed, "single_adapter": single, "naive_peft_sequential": naive,
        "mixed_vs_single": round(mixed["tokens_per_s"] / single["tokens_per_s"], 2),
        "mixed_vs_naive": round(mixed["tokens_per_s"] / naive["tokens_per_s"], 2),
        "hot_load_seconds_r16_all_linear": round(hot_load, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
