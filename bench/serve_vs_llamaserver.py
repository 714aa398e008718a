"""lorakit's server against llama.cpp's ``llama-server``, side by side in one run (issue 20).

Both serve the same weights on the same CPU, one server at a time, answering the same
requests through the same client (the official ``openai`` package, streaming, greedy,
``ignore_eos`` so every request generates exactly ``--tokens`` tokens):

* the base: lorakit loads the embedded SmolLM2 (``--dtype``); llama-server gets
  ``lorakit export gguf`` of that base in the matching type (f32 for float32, bf16 for
  bfloat16);
* ``--adapters`` random r=16 all-linear LoRA adapters (B ~ N(0, 1e-3), so the outputs move),
  given to lorakit as adapter folders and to llama-server as ``lorakit export gguf-lora``
  files (``--lora`` each, ``--lora-init-without-apply``, chosen per request with every
  adapter's scale, ``"lora": [{"id": i, "scale": 1}, {"id": j, "scale": 0}, ...]``).

Scenarios, each at every ``--concurrency``: ``base`` (no adapter), ``one`` (every request on
adapter 0), ``mixed`` (request i on adapter i mod N). Reported per server and scenario:
generated tokens/s over the wall time of the whole burst, mean / max time to first token,
and the ratios lorakit / llama-server. Each server is warmed up (every scenario once, untimed)
and measured ``--rounds`` times, the servers alternating; each scenario's median round counts
(the lower middle one for an even count: with the default 2, the slower round). llama-server runs with as many slots (``-np``) as the
largest concurrency and ``-t`` = the cores; it batches requests whose LoRA sets are equal.

    .venv/bin/python bench/serve_vs_llamaserver.py [--tokens 64] [--concurrency 8 32]
        [--dtype float32] [--out bench/results/serve_vs_llamaserver.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
LORAKIT = [sys.executable, "-m", "lorakit"]
GGUF_TYPE = {"float32": "f32", "bfloat16": "bf16"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready after {timeout} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(client, model: str, prompt: str, tokens: int, extra: dict) -> dict:
    start = time.perf_counter()
    first, text, finish = None, [], None
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, **extra})
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.text and first is None:
            first = time.perf_counter() - start
        text.append(choice.text or "")
        finish = choice.finish_reason or finish
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "text": "".join(text), "finish": finish}


def burst(url: str, requests: list[tuple[str, dict]], prompts: list[str], tokens: int,
          tokenizer) -> dict:
    """All requests sent at once; tokens/s over the burst's wall time."""
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600,
                    http_client=httpx.Client(trust_env=False,
                                             limits=httpx.Limits(max_connections=len(requests))))
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda i: one_request(client, requests[i][0], prompts[i], tokens,
                                                      requests[i][1]), range(len(requests))))
    wall = time.perf_counter() - start
    generated = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in results)
    ttft = [r["ttft"] for r in results]
    return {"requests": len(requests), "wall_s": round(wall, 3),
            "tokens": tokens * len(requests), "retokenized_tokens": generated,
            "tokens_per_s": round(tokens * len(requests) / wall, 2),
            "ttft_mean_s": round(sum(ttft) / len(ttft), 3), "ttft_max_s": round(max(ttft), 3),
            "finish_length": sum(r["finish"] == "length" for r in results),
            "texts": [r["text"] for r in results]}


def scenarios(n_adapters: int, count: int, *, lorakit: bool, base_name: str) -> dict:
    def req(adapter: int | None):
        if lorakit:
            return (base_name if adapter is None else f"ad{adapter}", {})
        # every adapter's scale spelled out: llama-server reads a missing (or empty) list as
        # "keep what the slot had", so `lora: []` after an adapter request is not the base
        # (measured: its "base" texts then matched transformers' greedy base 2 times in 8)
        lora = [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(n_adapters)]
        return ("base", {"lora": lora, "cache_prompt": False})

    return {"base": [req(None)] * count, "one": [req(0)] * count,
            "mixed": [req(i % n_adapters) for i in range(count)]}


def serve_and_measure(server: str, cmd: list[str], port: int, work: Path, args, prompts,
                      tokenizer) -> dict:
    """Start ``cmd`` (a server on ``port``), warm it up, run every scenario at every
    concurrency, stop it; ``{"<scenario>-<count>": burst result}``."""
    import httpx

    log = work / f"{server}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    lorakit = server == "lorakit"
    out = {}
    try:
        wait_ready(url, proc, log)
        base_name = ""
        if lorakit:
            names = [m["id"] for m in httpx.get(url + "/v1/models", trust_env=False).json()["data"]]
            base_name = next(n for n in names if not n.startswith("ad"))
        # warm-up, untimed: every scenario at every concurrency, 8 tokens (first-use costs:
        # adapter reads, kernel set-up for each batch shape, llama.cpp's slot buffers)
        for count in args.concurrency:
            for reqs in scenarios(args.adapters, count, lorakit=lorakit, base_name=base_name).values():
                burst(url, reqs, prompts, 8, tokenizer)
        for count in args.concurrency:
            for name, reqs in scenarios(args.adapters, count, lorakit=lorakit,
                                        base_name=base_name).items():
                r = out[f"{name}-{count}"] = burst(url, reqs, prompts, args.tokens, tokenizer)
                print(f"{server:12s} {name:5s} x{count}: {r['tokens_per_s']:7.1f} tok/s, "
                      f"TTFT {r['ttft_mean_s']:.2f} / {r['ttft_max_s']:.2f} s", flush=True)
    finally:
        stop(proc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=sorted(GGUF_TYPE))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure each server this many times, alternating; report the median")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_vs_llamaserver.json"))
    args = parser.parse_args()

    import torch

    import llamacpp
    from serve_mixed import make_adapters

    from lorakit.models.load import load_model

    work = Path(tempfile.mkdtemp(prefix="serve-vs-llama-"))
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    paths = make_adapters(model, tokenizer, work, args.adapters, r=16)
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a story about a lighthouse keeper, number {i}."}],
        add_generation_prompt=True, tokenize=False) for i in range(max(args.concurrency))]
    # the judge of the base texts: transformers' own greedy generate, one prompt at a time
    reference = []
    with torch.no_grad():
        for prompt in prompts[:min(args.concurrency)]:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 do_sample=False)
            reference.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    del model

    t0 = time.perf_counter()
    base_gguf = work / "base.gguf"
    subprocess.run([*LORAKIT, "export", "gguf", "--model", args.model, "--out", str(base_gguf),
                    "--type", GGUF_TYPE[args.dtype], "--no-check"], check=True,
                   stdout=subprocess.DEVNULL)
    lora_ggufs = []
    for p in paths:
        out = p.with_suffix(".gguf")
        subprocess.run([*LORAKIT, "export", "gguf-lora", "--adapter", str(p), "--model",
                        args.model, "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        lora_ggufs.append(out)
    print(f"exported the base and {len(paths)} adapters to GGUF in {time.perf_counter() - t0:.0f} s",
          flush=True)

    results = {"settings": {**vars(args), "torch_threads": torch.get_num_threads(),
                            "cpu": os.cpu_count()}}
    slots = max(args.concurrency)
    ctx = slots * (max(len(tokenizer(p)["input_ids"]) for p in prompts) + args.tokens + 16)

    # llama-server, then lorakit serve: one server at a time on the same cores
    port = free_port()
    cmd = [str(llamacpp.binary("llama-server")), "-m", str(base_gguf), "--host", "127.0.0.1",
           "--port", str(port), "-c", str(ctx), "-np", str(slots), "-t", str(args.threads),
           "--no-webui", "--lora-init-without-apply"]
    for g in lora_ggufs:
        cmd += ["--lora", str(g)]
    llama_cmd = cmd
    rounds = {"llama-server": [], "lorakit": []}
    for round_ in range(args.rounds):  # the servers alternate, so drifting machine speed hits both
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        port = free_port()
        cmd = [*llama_cmd[:llama_cmd.index("--port") + 1], str(port),
               *llama_cmd[llama_cmd.index("--port") + 2:]]
        rounds["llama-server"].append(serve_and_measure("llama-server", cmd, port, work, args,
                                                        prompts, tokenizer))
        port = free_port()
        cmd = [*LORAKIT, "serve", "--model", args.model, "--port", str(port), "--dtype", args.dtype,
               "--max-batch-size", str(slots), "--max-loaded-adapters", str(args.adapters),
               "--log", str(work / "requests.db")]
        for i, p in enumerate(paths):
            cmd += ["--adapter", f"ad{i}={p}"]
        rounds["lorakit"].append(serve_and_measure("lorakit", cmd, port, work, args, prompts,
                                                   tokenizer))
    for server, runs in rounds.items():  # per scenario: the round with the median tokens/s
        results[server] = {}
        for key in runs[0]:
            ordered = sorted((r[key] for r in runs), key=lambda r: r["tokens_per_s"])
            results[server][key] = {**ordered[(len(ordered) - 1) // 2],
                                    "rounds_tokens_per_s": [r[key]["tokens_per_s"] for r in runs]}

    ratios = {}
    for key, ours in results["lorakit"].items():
        theirs = results["llama-server"][key]
        same = sum(a == b for a, b in zip(ours["texts"], theirs["texts"]))
        ratios[key] = {"tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                       "ttft_mean": round(ours["ttft_mean_s"] / theirs["ttft_mean_s"], 3),
                       "same_text": f"{same}/{len(ours['texts'])}"}
    first = min(args.concurrency)
    for server in ("lorakit", "llama-server"):
        texts = results[server][f"base-{first}"]["texts"]
        ratios[f"{server} base texts equal to transformers' greedy"] = \
            f"{sum(a == b for a, b in zip(texts, reference))}/{len(reference)}"
    for server in ("lorakit", "llama-server"):
        for count in args.concurrency:
            r = results[server]
            ratios[f"{server} adapter path vs base x{count}"] = {
                "one": round(r[f"one-{count}"]["tokens_per_s"] / r[f"base-{count}"]["tokens_per_s"], 3),
                "mixed": round(r[f"mixed-{count}"]["tokens_per_s"] / r[f"base-{count}"]["tokens_per_s"], 3)}
    results["ratios"] = ratios
    for key, value in ratios.items():
        print(f"{key}: {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
