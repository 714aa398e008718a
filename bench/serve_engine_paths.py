"""The serving engine alone (no HTTP): decode throughput of the base, one adapter and 8 mixed
adapters, and optionally a cProfile of the decode step (issue 20).

N threads submit N greedy requests (``ignore_eos``, --tokens tokens each) to one
``lorakit.serve.engine.Engine`` on the embedded SmolLM2 in ``--dtype`` (float32); ``base`` runs with no adapter
loaded, ``one`` / ``mixed`` with 8 random r=16 all-linear adapters resident (request i on
adapter 0, or on adapter i mod 8). One untimed 8-token burst first. To compare two commits,
run it from each checkout alternately on the same cores (the machine's speed drifts).

    .venv/bin/python bench/serve_engine_paths.py one --requests 8 [--tokens 64] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["base", "one", "mixed"])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="cProfile one more burst's decode steps")
    args = parser.parse_args()

    from serve_mixed import make_adapters

    from lorakit.data.tokenize import prompt_ids
    from lorakit.models.load import load_model
    from lorakit.serve.engine import Engine, SamplingParams

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    adapters = [] if args.mode == "base" else make_adapters(model, tok, Path(tempfile.mkdtemp()), 8, r=16)
    engine = Engine(model, tok, max_batch_size=max(32, args.requests), max_loaded_adapters=8)
    for i, path in enumerate(adapters):
        engine.add_adapter(f"ad{i}", path, wait=False)
    engine.start()
    prompts = [prompt_ids(tok, f"Write a story about a lighthouse keeper, number {i}.")
               for i in range(args.requests)]

    def run(i: int, tokens: int) -> None:
        adapter = {"base": None, "one": "ad0"}.get(args.mode, f"ad{i % 8}")
        engine.generate(prompts[i], adapter, SamplingParams(max_tokens=tokens, temperature=0,
                                                            ignore_eos=True))

    def burst(tokens: int) -> float:
        threads = [threading.Thread(target=run, args=(i, tokens)) for i in range(args.requests)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    try:
        burst(8)
        wall = burst(args.tokens)
        print(f"{args.mode} x{args.requests}: {args.requests * args.tokens / wall:.1f} tokens/s "
              f"({wall:.2f} s)", flush=True)
        if args.profile:
            profiler, step = cProfile.Profile(), engine._decode_step

            def profiled() -> None:
                profiler.enable()
                step()
                profiler.disable()

            engine._decode_step = profiled
            burst(args.tokens)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
