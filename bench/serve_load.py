"""A load test of the real server on loopback (official openai client, greedy).

Two modes, both bounded in time and never leaving 127.0.0.1:

* default: 200 requests from 16 concurrent clients over the base + 4 adapters; errors and
  p50/p99 latency.
* ``--hostile``: 16 clients for ``--duration`` seconds, run twice on fresh servers: once with
  good requests only, once with bad requests mixed in (``--bad-share`` of them: a denormal
  temperature, a huge seed, NaN, a body over the limit, no key, an unknown model, an adapter
  with a catastrophic regex, one with a tensor of the wrong rank) and one adapter swap
  (unload + load of the same name) every 10 s while streams run on it. Reports good requests
  failed (the promise: 0), bad requests answered with the expected 4xx, and the good requests'
  p50/p99 latency in both runs side by side.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m-instruct] [--requests 200]
    .venv/bin/python bench/serve_load.py --hostile [--duration 60] [--model tiny]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


BAD_KINDS = ("denormal", "seed", "nan", "big", "nokey", "unknown", "regex", "rank")


def _tiny(tmp: Path):
    """The tiny test model (hidden 64, 2 layers) with the SmolLM2 tokenizer."""
    import torch
    import transformers as tf

    from lorakit.models.load import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, tie_word_embeddings=True,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    return load_model(tmp / "tiny")


def _broken_adapters(root: Path, good: Path) -> dict[str, Path]:
    """Adapters that pass the file checks' first look but must be refused at load."""
    from safetensors.torch import load_file, save_file

    out = {}
    regex = shutil.copytree(good, root / "bad_regex")
    cfg = json.loads((regex / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"(a+)+$": 8}
    (regex / "adapter_config.json").write_text(json.dumps(cfg))
    out["regex"] = regex
    rank = shutil.copytree(good, root / "bad_rank")
    tensors = load_file(rank / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key][0].contiguous()
    save_file(tensors, rank / "adapter_model.safetensors")
    out["rank"] = rank
    return out


def hostile_run(args, base, tokenizer, root: Path, paths, bad: bool) -> dict:
    import httpx
    import numpy as np
    import openai

    from lorakit.serve.api import ServerThread, create_app
    from lorakit.serve.engine import Engine

    engine = Engine(copy.deepcopy(base), tokenizer, base_name="base", adapter_root=root,
                    max_loaded_adapters=args.adapters + 2, max_batch_size=args.clients).start()
    for i, path in enumerate(paths):
        engine.add_adapter(f"ad{i}", path, wait=True)
    engine.add_adapter("swap", paths[0], wait=True)
    app = create_app(engine, api_key="bench")
    app.state.limits.max_body_bytes = 256 * 1024
    server = ServerThread(app).start()
    url, auth = server.url, {"Authorization": "Bearer bench"}
    # one pooled HTTP client for the bad traffic and the swaps: the clients share this process
    # with the server, and a fresh httpx client per request (TLS context and all) would spend
    # the server's CPU, not the attacker's
    http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64))
    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=120)
    models = ["base"] + [f"ad{i}" for i in range(args.adapters)]
    broken = _broken_adapters(root, paths[0]) if bad else {}
    stop_at = time.monotonic() + args.duration
    lock = threading.Lock()
    good, bad_answers = [], []  # (latency | None, error)
    swap_stats = {"swaps": 0, "swap_failed": 0, "on_swap_ok": 0, "on_swap_404": 0,
                  "on_swap_failed": 0}

    def bad_request(rng):
        kind = rng.choice(args.bad_kinds)
        msg = [{"role": "user", "content": "hi"}]
        body = {"model": rng.choice(models), "messages": msg, "max_tokens": 8}
        headers = auth
        if kind == "denormal":
            body["temperature"] = 1e-310
        elif kind == "seed":
            body["seed"] = 2**70
        elif kind == "nan":
            body["temperature"] = float("nan")
        elif kind == "big":
            body["messages"] = [{"role": "user", "content": "x" * 300_000}]
        elif kind == "nokey":
            headers = {}
        elif kind == "unknown":
            body["model"] = "no-such-model"
        try:
            if kind in ("regex", "rank"):
                r = http.post(url + "/v1/load_lora_adapter", headers=auth, timeout=60,
                              json={"lora_name": f"bad-{kind}", "lora_path": str(broken[kind])})
            else:
                r = http.post(url + "/v1/chat/completions", headers={**headers, "Content-Type":
                              "application/json"}, content=json.dumps(body), timeout=60)
        except httpx.ReadError:
            # the server answered 413 from the headers and closed while the client was still
            # sending: the client may see the reset before it reads the answer
            return kind, "reset"
        return kind, r.status_code

    def client_loop(seed):
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            if bad and rng.random() < args.bad_share:
                try:
                    kind, status = bad_request(rng)
                    with lock:
                        bad_answers.append((kind, status))
                except Exception as exc:  # noqa: BLE001 - counted
                    with lock:
                        bad_answers.append(("exception", repr(exc)))
                continue
            model = rng.choice(models)
            prompt = f"Question {rng.randint(0, 10**6)}: what is {rng.randint(2, 99)} squared?"
            start = time.perf_counter()
            try:
                client.chat.completions.create(model=model, max_tokens=args.tokens,
                                               temperature=0,
                                               messages=[{"role": "user", "content": prompt}])
                result = (time.perf_counter() - start, None)
            except Exception as exc:  # noqa: BLE001 - a failed good request
                result = (None, repr(exc)[:200])
            with lock:
                good.append(result)

    def swapper():
        i = 0
        while time.monotonic() < stop_at - 1:
            deadline = time.monotonic() + 10
            ended = False
            while time.monotonic() < deadline:
                if time.monotonic() >= stop_at:
                    ended = True
                    break
                time.sleep(0.1)
            if ended:
                break
            i += 1
            try:
                r1 = http.post(url + "/v1/unload_lora_adapter", headers=auth, timeout=60,
                                json={"lora_name": "swap"})
                r2 = http.post(url + "/v1/load_lora_adapter", headers=auth, timeout=120,
                                json={"lora_name": "swap",
                                      "lora_path": str(paths[i % len(paths)])})
                ok = r1.status_code == 200 and r2.status_code == 200
            except Exception:  # noqa: BLE001
                ok = False
            with lock:
                swap_stats["swaps"] += 1
                swap_stats["swap_failed"] += not ok

    def swap_user():
        """Streams on the swapped name: accepted ones must finish; a 404 in the instant
        between unload and load is the contract (the name is not served then)."""
        while time.monotonic() < stop_at:
            try:
                stream = client.chat.completions.create(
                    model="swap", max_tokens=args.tokens * 2, temperature=0, stream=True,
                    messages=[{"role": "user", "content": "Tell me about lighthouses."}])
                for _ in stream:
                    pass
                key = "on_swap_ok"
            except openai.NotFoundError:
                key = "on_swap_404"
            except Exception:  # noqa: BLE001
                key = "on_swap_failed"
            with lock:
                swap_stats[key] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    if bad and not args.no_swap:
        threads += [threading.Thread(target=swapper), threading.Thread(target=swap_user)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    http.close()
    server.stop()
    engine.stop()
    latencies = np.array([g[0] for g in good if g[0] is not None])
    failed = [g[1] for g in good if g[1]]
    expected = {"denormal": 400, "seed": 400, "nan": 400, "big": 413, "nokey": 401,
                "unknown": 404, "regex": 400, "rank": 400}
    wrong = [b for b in bad_answers if expected.get(b[0]) != b[1]
             and not (b[0] == "big" and b[1] == "reset")]
    def pct(q):
        return round(float(np.percentile(latencies, q)), 3) if len(latencies) else None

    out = {"good_requests": len(good), "good_failed": len(failed), "first_failures": failed[:3],
           "good_per_s": round(len(latencies) / wall, 2), "latency_p50_s": pct(50),
           "latency_p99_s": pct(99), "wall_s": round(wall, 1)}
    if bad:
        out |= {"bad_requests": len(bad_answers), "bad_not_as_expected": wrong[:5],
                **swap_stats}
    return out


def hostile(args) -> None:
    from lorakit.models.load import load_model
    from serve_mixed import make_adapters

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, tokenizer = _tiny(tmp) if args.model == "tiny" else load_model(args.model)
        root = tmp / "adapters"
        root.mkdir()
        paths = make_adapters(base, tokenizer, root, args.adapters, 16)
        report = {"model": args.model, "clients": args.clients, "duration_s": args.duration,
                  "adapters": args.adapters, "max_tokens": args.tokens,
                  "bad_share": args.bad_share}
        report["clean"] = hostile_run(args, base, tokenizer, root, paths, bad=False)
        report["hostile"] = hostile_run(args, base, tokenizer, root, paths, bad=True)
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model spec, or 'tiny' (the test suite's tiny Llama)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds, then stop")
    parser.add_argument("--hostile", action="store_true",
                        help="timed run with bad traffic and adapter swaps, beside a clean one")
    parser.add_argument("--duration", type=float, default=60, help="--hostile: seconds per run")
    parser.add_argument("--bad-share", type=float, default=0.3,
                        help="--hostile: share of the clients' requests that are bad")
    parser.add_argument("--bad-kinds", default=",".join(BAD_KINDS),
                        help=f"--hostile: which bad requests (default: all of {BAD_KINDS})")
    parser.add_argument("--no-swap", action="store_true", help="--hostile: no adapter swaps")
    args = parser.parse_args()
    args.bad_kinds = [k for k in args.bad_kinds.split(",") if k]
    if args.hostile:
        return hostile(args)

    import numpy as np
    import openai

    from lorakit.models.load import load_model
    from lorakit.serve.api import ServerThread, create_app
    from lorakit.serve.engine import Engine
    from serve_mixed import make_adapters

    base, tokenizer = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, tokenizer, Path(tmp), args.adapters, 16)
        engine = Engine(copy.deepcopy(base), tokenizer, base_name="base",
                        max_loaded_adapters=args.adapters, max_batch_size=args.clients)
        for i, path in enumerate(paths):
            engine.add_adapter(f"ad{i}", path, wait=False)
        server = ServerThread(create_app(engine, api_key="bench")).start()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0,
                               timeout=args.time_limit)
        rng = random.Random(0)
        models = ["base"] + [f"ad{i}" for i in range(args.adapters)]
        jobs = [(rng.choice(models), f"Question {i}: what is {rng.randint(2, 99)} squared?")
                for i in range(args.requests)]
        deadline = time.monotonic() + args.time_limit

        def one(job):
            if time.monotonic() > deadline:
                return None, "skipped: time limit"
            start = time.perf_counter()
            try:
                client.chat.completions.create(model=job[0], max_tokens=args.tokens, temperature=0,
                                               messages=[{"role": "user", "content": job[1]}])
            except Exception as exc:  # noqa: BLE001 - counted
                return None, repr(exc)
            return time.perf_counter() - start, None

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, jobs))
        wall = time.perf_counter() - start
        server.stop()
        engine.stop()
    latencies = np.array([r[0] for r in results if r[0] is not None])
    errors = [r[1] for r in results if r[1]]
    print(json.dumps({
        "model": args.model, "requests": args.requests, "clients": args.clients,
        "adapters": args.adapters, "max_tokens": args.tokens, "errors": len(errors),
        "first_errors": errors[:3], "wall_seconds": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else None,
    }, indent=2))


if __name__ == "__main__":
    main()
