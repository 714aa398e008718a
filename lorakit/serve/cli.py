"""``lorakit serve`` (the OpenAI-compatible server) and ``lorakit monitor drift``.

Kept light to import: torch, transformers and fastapi are imported inside the commands.
"""

from __future__ import annotations

import argparse
import json

DEFAULT_MODEL = "smollm2-135m-instruct"  # same as lorakit.models.load.DEFAULT_MODEL


def _adapter_pair(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=DIR, got {value!r}")
    return name, path


def add_parsers(subparsers) -> None:
    """Add ``serve`` and ``monitor`` to the ``lorakit`` parser."""
    serve = subparsers.add_parser(
        "serve", help="serve a base model and many LoRA adapters over an OpenAI-compatible API",
        description="Serve one base model and any number of LoRA adapters with an "
                    "OpenAI-compatible HTTP API (FastAPI + uvicorn). Requests for different "
                    "adapters are decoded together in one batch. Clients pick the adapter with "
                    "the `model` field; /v1/load_lora_adapter and /v1/unload_lora_adapter take "
                    "vLLM's request shapes. Requests are logged to SQLite (see `lorakit monitor "
                    "drift`); /metrics is Prometheus text.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  lorakit serve --adapter sql=runs/demo/adapter\n"
               "  lorakit serve --model ./base --adapter-root ./adapters --api-key $KEY\n"
               "  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "       -d '{\"model\": \"sql\", \"messages\": [{\"role\": \"user\", "
               "\"content\": \"hi\"}]}'")
    serve.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                       help="base model: built-in alias, HF folder, .gguf file or hub id "
                            f"(default: {DEFAULT_MODEL})")
    serve.add_argument("--adapter", action="append", type=_adapter_pair, default=[],
                       metavar="NAME=DIR", help="serve the adapter in DIR as model NAME "
                                                "(repeatable)")
    serve.add_argument("--adapter-root", metavar="DIR",
                       help="folder that adapters loaded at runtime (/v1/load_lora_adapter) must "
                            "be inside; without it runtime loading is refused")
    serve.add_argument("--quantization", choices=["nf4"], default=None,
                       help="load the base in 4-bit NF4 (bitsandbytes), as in QLoRA")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on "
                                                           "(default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1 routes (default: the "
                            "LORAKIT_API_KEY environment variable; none = open)")
    serve.add_argument("--keys-file", metavar="FILE",
                       help="API keys with owners ('KEY OWNER' per line, or a JSON object); "
                            "each owner sees only its own files, jobs and fine-tuned models")
    serve.add_argument("--max-loaded-adapters", type=int, default=8, metavar="N",
                       help="adapters kept in memory at once; least recently used ones are "
                            "evicted and reloaded on demand (default: 8)")
    serve.add_argument("--max-batch-size", type=int, default=16, metavar="B",
                       help="requests decoded together (default: 16)")
    serve.add_argument("--max-prefill-tokens", type=int, default=4096, metavar="T",
                       help="requests that arrive together are prefilled in one forward while "
                            "rows x longest prompt stays within T tokens; 1 prefills each "
                            "prompt alone (default: 4096)")
    serve.add_argument("--max-model-len", type=int, default=None, metavar="L",
                       help="longest prompt + completion in tokens (default: the model's "
                            "max_position_embeddings)")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20, metavar="N",
                       help="largest request body outside uploads, checked from Content-Length "
                            "and while the body streams in; larger is a 413 (default: 4 MiB)")
    serve.add_argument("--max-upload-bytes", type=int, default=1 << 30, metavar="N",
                       help="largest /v1/files upload (default: 1 GiB)")
    serve.add_argument("--request-timeout", type=float, default=600, metavar="S",
                       help="a generation not finished S seconds after it arrived ends with a "
                            "504 (waiting included; 0 = no deadline; default: 600)")
    serve.add_argument("--shutdown-timeout", type=float, default=30, metavar="S",
                       help="on SIGTERM / Ctrl-C, wait at most S seconds for running requests "
                            "(default: 30)")
    serve.add_argument("--trusted-proxy", metavar="IPS",
                       help="comma-separated addresses of reverse proxies whose X-Forwarded-Proto "
                            "/ X-Forwarded-For are believed (the UI's cookie is Secure when the "
                            "page came over https); default: none, the headers are ignored")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the base model's id in the API (default: --model as given)")
    serve.add_argument("--log", default="lorakit-requests.db", metavar="DB",
                       help="SQLite request log (default: lorakit-requests.db; 'none' = off)")
    serve.add_argument("--log-text", action="store_true",
                       help="also log prompt and completion texts (needed for token drift)")
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                       help="base model dtype (default: bfloat16 where the device runs it natively: a "
                            "GPU with bf16, a CPU with AVX512-BF16 or AMX; else float32)")
    serve.set_defaults(func=run_serve)

    monitor = subparsers.add_parser(
        "monitor", help="look at what a running server has been asked",
        description="Read the server's request log.")
    msub = monitor.add_subparsers(dest="monitor_command", metavar="COMMAND")
    drift = msub.add_parser(
        "drift", help="compare recent prompts with an adapter's training data",
        description="Compare logged prompts with the training prompts: prompt length "
                    "distribution (population stability index), token distribution "
                    "(Jensen-Shannon divergence, needs a log written with --log-text) and the "
                    "share of out-of-distribution prompts. Prints a verdict (ok / warn / drift) "
                    "with its thresholds and writes a PNG of the measures over time windows.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit monitor drift --log lorakit-requests.db "
               "--reference data/train.jsonl --adapter sql --since 7d")
    drift.add_argument("--log", required=True, metavar="DB", help="the server's SQLite log")
    drift.add_argument("--reference", required=True, metavar="TRAIN.jsonl",
                       help="the adapter's training data (any format lorakit data reads)")
    drift.add_argument("--adapter", metavar="NAME",
                       help="only requests to this adapter (the base model's id: base requests)")
    drift.add_argument("--since", metavar="WHEN",
                       help="only requests after WHEN: 30m, 24h, 7d, an ISO date, unix seconds")
    drift.add_argument("--model", metavar="MODEL",
                       help="tokenizer to count tokens with (default: the base the log records)")
    drift.add_argument("--plot", default="drift.png", metavar="PNG",
                       help="where to write the plot (default: drift.png)")
    drift.add_argument("--windows", type=int, default=6, help="time windows in the plot "
                                                              "(default: 6)")
    drift.add_argument("--json", action="store_true", help="print the report as JSON")
    drift.set_defaults(func=run_drift)
    monitor.set_defaults(func=lambda args: (monitor.print_help(), 1)[1])


def run_serve(args, extend=None) -> int:
    """``lorakit serve``: load the base, register adapters, run uvicorn in the foreground.

    Args:
        args: the parsed ``serve`` options.
        extend: ``extend(args, engine, app) -> stop | None``, what another package adds to the
            app before it serves (``lorakit.jobs.cli`` adds the fine-tuning service this way);
            ``stop()`` runs when the server exits, before the engine stops.
    """
    import uvicorn

    from lorakit.errors import ConfigError
    from lorakit.models.load import inference_dtype, load_model
    from lorakit.serve.api import create_app
    from lorakit.serve.auth import api_key_from_env, load_keys
    from lorakit.serve.engine import Engine
    from lorakit.serve.limits import Limits
    from lorakit.serve.monitor import RequestLog

    if args.max_loaded_adapters < 1 or args.max_batch_size < 1 or args.max_prefill_tokens < 1:
        raise ConfigError("--max-loaded-adapters, --max-batch-size and --max-prefill-tokens "
                          "must be >= 1")
    if args.max_body_bytes < 1024 or args.max_upload_bytes < 1024:
        raise ConfigError("--max-body-bytes and --max-upload-bytes must be at least 1024")
    if args.request_timeout < 0 or args.shutdown_timeout < 0:
        raise ConfigError("--request-timeout and --shutdown-timeout must be >= 0")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes,
                    request_timeout=args.request_timeout or None)
    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapter names must be unique, got {names}")
    dtype, dtype_note = args.dtype, ""
    if dtype is None and not args.quantization:
        dtype, why = inference_dtype()
        dtype_note = f" in {str(dtype).removeprefix('torch.')} ({why}; --dtype overrides)"
    model, tokenizer = load_model(args.model, dtype, quantization=args.quantization)
    base_name = args.served_model_name or args.model
    engine = Engine(model, tokenizer, base_name=base_name, adapter_root=args.adapter_root,
                    max_loaded_adapters=args.max_loaded_adapters,
                    max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                    max_prefill_tokens=args.max_prefill_tokens)
    engine.start()
    for name, path in args.adapter:
        engine.add_adapter(name, path, source="static",
                           wait=len(engine.resident_adapters()) < args.max_loaded_adapters)
    log = None if args.log == "none" else RequestLog(args.log, log_text=args.log_text,
                                                     base_model=getattr(model, "lorakit_spec", None))
    api_key = api_key_from_env(args.api_key)
    api_keys = load_keys(args.keys_file) if args.keys_file else None
    app = create_app(engine, api_key=api_key, api_keys=api_keys, request_log=log, limits=limits)
    stop = extend(args, engine, app) if extend is not None else None
    if stop is not None:
        app.state.shutdown_hooks.append(stop)
    app.state.shutdown_hooks.append(engine.stop)
    print(f"lorakit serve: {base_name} + {len(names)} adapter(s){dtype_note} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key or api_keys else ''}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                    timeout_graceful_shutdown=args.shutdown_timeout,
                    proxy_headers=bool(args.trusted_proxy),
                    forwarded_allow_ips=args.trusted_proxy or "")
    finally:  # normally done by the shutdown hooks already; both are idempotent
        engine.stop()
    return 0


def run_drift(args) -> int:
    """``lorakit monitor drift``."""
    from pathlib import Path

    from lorakit.errors import ConfigError
    from lorakit.models.load import load_tokenizer
    from lorakit.serve.monitor import RequestLog, drift, parse_since, plot_drift, reference_prompts

    if not Path(args.log).is_file():
        raise ConfigError(f"--log {args.log}: no such request log (lorakit serve --log DB)")
    log = RequestLog(args.log)
    spec = args.model or log.meta("base_model")
    if not spec:
        raise ConfigError(f"{args.log} does not record its base model; pass --model MODEL")
    tokenizer = load_tokenizer(spec)
    adapter = args.adapter
    rows = log.rows(since=parse_since(args.since))
    if adapter is not None:
        base = {None, spec}
        rows = [r for r in rows if r["adapter"] == adapter
                or (r["adapter"] is None and adapter in base)]
    if not rows:
        raise ConfigError(f"{args.log}: no requests{' for ' + adapter if adapter else ''}"
                          f"{' since ' + args.since if args.since else ''} to compare")
    report = drift(rows, reference_prompts(args.reference, tokenizer), tokenizer,
                   windows=args.windows)
    plot = plot_drift(report, args.plot)
    if args.json:
        print(json.dumps({**report, "plot": str(plot)}, indent=2))
        return 0

    def fmt(v):
        return "n/a (log written without --log-text)" if v is None else f"{v:.3f}"

    t = report["thresholds"]
    print(f"requests compared:          {report['requests']}")
    print(f"prompt length PSI:          {fmt(report['psi_length'])}   "
          f"(warn > {t['psi_length'][0]}, drift > {t['psi_length'][1]})")
    print(f"token JS divergence:        {fmt(report['js_tokens'])}   "
          f"(warn > {t['js_tokens'][0]}, drift > {t['js_tokens'][1]})")
    print(f"out-of-distribution share:  {fmt(report['ood_share'])}   "
          f"(warn > {t['ood_share'][0]}, drift > {t['ood_share'][1]})")
    print(f"verdict: {report['verdict'].upper()}"
          + (f" ({'; '.join(report['reasons'])})" if report["reasons"] else ""))
    print(f"plot: {plot}")
    return 0
