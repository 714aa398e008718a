"""Two ways to make CPU decode's linear layers cheaper, measured (issue 20): FBGEMM dynamic
int8 quantization and the ``W @ x.T`` operand order, against fp32 ``F.linear``.

Speed: the 211 linear layers of one SmolLM2-135M decode step (30 blocks of q/k/v/o/gate/up/down
shapes plus the 49152-row head, random fp32 weights, so nothing stays in cache between calls)
at 8 and 32 rows, the variants alternated for ``--rounds`` rounds (this machine's speed drifts).
Quality of int8: perplexity of the embedded SmolLM2 on the first 20 bundled SQL eval examples
(prompt + completion), and how many greedy tokens (32 per prompt, first 8 prompts) stay equal
to the fp32 model's before the first difference.

    .venv/bin/python bench/decode_linears.py [--rounds 3] [--no-quality]

End to end (``--engine ROUNDS``): the serving engine on the embedded SmolLM2 in fp32 with every
plain ``nn.Linear`` computing ``(W @ x.T).T`` for at most 32 rows (a class defined here and
swapped in between bursts), alternated burst by burst with ``F.linear`` in one process, for the
base and for 8 mixed r=16 adapters at 8 requests x 32 greedy tokens; medians and their ratio.

    .venv/bin/python bench/decode_linears.py --engine 5 --json bench/results/decode_linears_engine.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def timed(fn, repeats: int = 4) -> float:
    """Milliseconds per call of ``fn``, after one untimed call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def speed(rounds: int) -> dict:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao.quantization
    torch.manual_seed(0)
    layers = [torch.nn.Linear(i, o, bias=False) for _ in range(30) for o, i in SHAPES]
    layers.append(torch.nn.Linear(576, 49152, bias=False))
    stack = torch.nn.ModuleList(layers)
    int8 = torch.ao.quantization.quantize_dynamic(stack, {torch.nn.Linear}, dtype=torch.qint8)
    out = {}
    with torch.no_grad():
        for rows in (8, 32):
            inputs = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
            variants = {
                "fp32 F.linear": lambda: [F.linear(inputs[m.in_features], m.weight) for m in stack],
                "fp32 W @ x.T": lambda: [torch.mm(m.weight, inputs[m.in_features].t()).t().contiguous()
                                         for m in stack],
                "int8 dynamic": lambda: [m(inputs[m.in_features]) for m in int8],
            }
            times = {name: [] for name in variants}
            for _ in range(rounds):
                for name, fn in variants.items():
                    times[name].append(round(timed(fn), 1))
            out[rows] = times
            print(f"{rows} rows, ms per step's linears: {times}", flush=True)
    return out


def quality() -> dict:
    from lorakit.models.load import load_model

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32)
    model.eval()
    rows = [json.loads(line) for line in
            (ROOT / "lorakit/examples/sql/eval.jsonl").read_text().splitlines()[:20]]

    def perplexity(m) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for r in rows:
                ids = tok(r["prompt"] + r["completion"], return_tensors="pt").input_ids
                total += m(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
        return math.exp(total / count)

    def common_prefix(a, b) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    out = {"fp32": {"perplexity": round(perplexity(model), 2)}}
    for name, with_head in (("int8 (head fp32)", False), ("int8 (head too)", True)):
        spec = {n for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and (with_head or n != "lm_head")}
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
        same = total = 0
        with torch.no_grad():
            for r in rows[:8]:
                ids = tok(r["prompt"], return_tensors="pt").input_ids
                a = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
                b = q.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:]
                same += common_prefix(a.tolist(), b.tolist())
                total += len(a)
        out[name] = {"perplexity": round(perplexity(q), 2), "greedy_prefix_tokens": [same, total]}
        print(name, out[name], flush=True)
    print("fp32", out["fp32"])
    return out


class MmLinear(torch.nn.Linear):
    """``(W @ x.T).T`` for a no-grad float32 forward over at most 32 rows, else ``F.linear``."""

    def forward(self, x):
        rows = x.numel() // self.in_features
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and 0 < rows <= 32:
            out = torch.mm(self.weight, x.reshape(rows, self.in_features).t()).t()
            out = out + self.bias if self.bias is not None else out.contiguous()
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def engine(rounds: int, requests: int = 8, tokens: int = 32) -> dict:
    import statistics
    import sys
    import tempfile
    import threading

    sys.path.insert(0, str(ROOT / "bench"))
    from serve_mixed import make_adapters

    from lorakit.data.tokenize import prompt_ids
    from lorakit.models.load import load_model
    from lorakit.serve.engine import Engine, SamplingParams

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32)
    paths = make_adapters(model, tok, Path(tempfile.mkdtemp()), 8, r=16)
    eng = Engine(model, tok, max_batch_size=32, max_loaded_adapters=8)
    for i, path in enumerate(paths):
        eng.add_adapter(f"ad{i}", path, wait=False)
    eng.start()
    prompts = [prompt_ids(tok, f"Write a story about a lighthouse keeper, number {i}.")
               for i in range(requests)]

    def burst(mode: str) -> float:
        def run(i):
            eng.generate(prompts[i], None if mode == "base" else f"ad{i % 8}",
                         SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        threads = [threading.Thread(target=run, args=(i,)) for i in range(requests)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return round(requests * tokens / (time.perf_counter() - start), 1)

    def swap(to) -> None:  # between bursts, while the engine thread is idle
        for module in model.modules():
            if type(module) in (torch.nn.Linear, MmLinear):
                module.__class__ = to

    out = {}
    try:
        for mode in ("base", "mixed"):
            burst(mode)  # warm-up
            rates = {"W @ x.T": [], "F.linear": []}
            for _ in range(rounds):
                for name, cls in (("W @ x.T", MmLinear), ("F.linear", torch.nn.Linear)):
                    swap(cls)
                    rates[name].append(burst(mode))
            med = {k: statistics.median(v) for k, v in rates.items()}
            out[mode] = {"tokens_per_s": rates, "median": med,
                         "ratio": round(med["W @ x.T"] / med["F.linear"], 2)}
            print(mode, out[mode], flush=True)
    finally:
        eng.stop()
    return {"requests": requests, "tokens": tokens, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--engine", type=int, default=0, metavar="ROUNDS",
                    help="only the end-to-end engine comparison, for ROUNDS alternated rounds")
    ap.add_argument("--json", default=str(ROOT / "bench/results/decode_linears.json"))
    args = ap.parse_args()
    if args.engine:
        result = {"threads": torch.get_num_threads(), "engine": engine(args.engine)}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
    result = {"threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "speed_ms": speed(args.rounds)}
    if not args.no_quality:
        result["quality"] = quality()
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
