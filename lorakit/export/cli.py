"""``lorakit merge``, ``lorakit export ...`` and ``lorakit check-adapter``: leaving lorakit.

Kept light to import: torch, transformers and gguf are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
           "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_MODEL_HELP = ("the base model (alias, Hugging Face folder, .gguf file or hub id); default: the "
               "base_model recorded in the adapter's lorakit.json / adapter_config.json")


def _read_prompts(path: str | None) -> list[str] | None:
    if not path:
        return None
    from pathlib import Path

    from lorakit.errors import ConfigError

    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise ConfigError(f"cannot read --prompts file {path}: {exc}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def add_parsers(subparsers) -> None:
    """Add ``merge``, ``export`` and ``check-adapter`` to the ``lorakit`` parser."""
    merge = subparsers.add_parser(
        "merge", help="fold an adapter into its base and write a standard Hugging Face folder",
        description="Fold a LoRA adapter (plain, rsLoRA, DoRA, modules_to_save; QLoRA adapters "
                    "are folded into the dequantized base, never into 4-bit weights) into its "
                    "base model and write a standard Hugging Face folder: config.json, "
                    "model.safetensors (sharded with an index when large), generation_config."
                    "json, tokenizer files and chat template. transformers' "
                    "AutoModelForCausalLM.from_pretrained(OUT) loads it without lorakit.\n\n"
                    "Parity gate: the written folder is read back and compared with the adapter "
                    "on its base (and on the 4-bit base for QLoRA) on a fixed set of prompts: "
                    "max |logit diff|, mean KL, argmax and greedy-decoding agreement. When it is "
                    "worse than the thresholds for the dtype (docs/export.md) the command exits "
                    "with status 2 and nothing is written, unless --force.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit merge --adapter runs/demo/adapter --out merged/\n"
               "  lorakit merge --adapter runs/demo/adapter --out merged-bf16/ --dtype bf16")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder")
    merge.add_argument("--model", metavar="MODEL", help=_MODEL_HELP)
    merge.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                       help="dtype of the written weights (default: fp32)")
    merge.add_argument("--force", action="store_true",
                       help="keep the output even when the parity gate fails, and export even "
                            "when lorakit.json says the adapter was trained on another base")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out when it already exists")
    merge.add_argument("--prompts", metavar="FILE",
                       help="prompts for the parity check, one per line (default: 4 built-in)")
    merge.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                       help="greedy tokens decoded per prompt in the parity check (default: 16)")
    merge.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                       help="largest safetensors shard, e.g. 2GB or 500MB (default: 2GB)")
    merge.add_argument("--parity-by-layer", default="auto", choices=["auto", "on", "off"],
                       help="run the parity gate's float32 models layer by layer, reading each "
                            "block's weights just before it runs (about one layer in memory "
                            "instead of the model; same logits, slower). auto (default): when "
                            "the float32 model would take over half the free memory")
    merge.add_argument("--json", action="store_true", help="also print the result as JSON")
    merge.set_defaults(func=run_merge)

    export = subparsers.add_parser(
        "export", help="write GGUF files for llama.cpp, or the vLLM command for adapters",
        description="Ship a model or adapters to another runtime: `gguf` (merged model for "
                    "llama.cpp), `gguf-lora` (the adapter alone, as a llama.cpp LoRA GGUF), "
                    "`vllm` (the vllm serve command and /v1/load_lora_adapter bodies).")
    targets = export.add_subparsers(dest="export_target", metavar="TARGET", required=True)
    gguf = targets.add_parser(
        "gguf", help="the merged model as a GGUF file (llama, mistral, qwen2)",
        description="Merge the adapter into its base (QLoRA: the dequantized base) and write "
                    "a GGUF file with the gguf package, tokenizer and chat template included. "
                    "Supported architectures: llama, mistral, qwen2. The file is then checked: "
                    "llama.cpp (llama-cpp-python, the `llamacpp` extra; else transformers "
                    "reading the GGUF back) decodes the parity prompts greedily; for f32/f16 "
                    "the tokens must equal the merged model's, else nothing is written and the "
                    "exit status is 2 (unless --force); for bf16/q8_0 the agreement is printed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit export gguf --adapter runs/demo/adapter --out demo.gguf\n"
               "  lorakit export gguf --model smollm2-135m-instruct --out base.gguf --type f32")
    _merged_gguf_flags(gguf, "FILE.gguf", "the file to write",
                       no_check="skip the greedy-decoding check")
    gguf.set_defaults(func=run_export_gguf)

    lora = targets.add_parser(
        "gguf-lora", help="the adapter alone as a llama.cpp LoRA adapter GGUF",
        description="Write the adapter as a llama.cpp LoRA GGUF, used as "
                    "llama_cpp.Llama(model_path=BASE.gguf, lora_path=FILE.gguf) or "
                    "llama-server --lora FILE.gguf. The scaling is folded into lora_b. DoRA, "
                    "modules_to_save and trained biases cannot be expressed: export the merged "
                    "model instead. With --base-gguf (the base written by `export gguf`, best "
                    "f32), llama.cpp with the LoRA must decode what the adapter on its base "
                    "decodes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lorakit export gguf --model smollm2-135m-instruct --out base.gguf "
               "--type f32\n  lorakit export gguf-lora --adapter runs/demo/adapter --out "
               "demo-lora.gguf --base-gguf base.gguf")
    lora.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder")
    lora.add_argument("--model", metavar="MODEL", help=_MODEL_HELP)
    lora.add_argument("--out", required=True, metavar="FILE.gguf", help="the file to write")
    lora.add_argument("--base-gguf", metavar="BASE.gguf",
                      help="check the LoRA GGUF on this base GGUF with llama.cpp")
    _common_out_flags(lora)
    lora.set_defaults(func=run_export_gguf_lora)

    vllm = targets.add_parser(
        "vllm", help="check adapters for vLLM and print the vllm serve command",
        description="Run the vLLM checks of `lorakit check-adapter` on each adapter, then "
                    "print the `vllm serve` command line (--enable-lora --lora-modules "
                    "NAME=DIR ... --max-lora-rank R --max-loras K) and the JSON bodies for "
                    "vLLM's POST /v1/load_lora_adapter. Exits 1 when an adapter has an error "
                    "finding (vLLM would reject it).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  lorakit export vllm --adapter sql=runs/sql/adapter "
               "--adapter chat=runs/chat/adapter")
    vllm.add_argument("--adapter", required=True, action="append", metavar="NAME=DIR",
                      help="an adapter and the name clients will request (repeatable)")
    vllm.add_argument("--model", metavar="MODEL",
                      help="the base vLLM serves (default: the first adapter's recorded base)")
    vllm.add_argument("--max-lora-rank", type=int, metavar="N",
                      help="force --max-lora-rank (default: the smallest allowed >= the ranks)")
    vllm.add_argument("--json", action="store_true", help="print everything as one JSON object")
    vllm.set_defaults(func=run_export_vllm)
    _add_ollama_parser(targets)

    check = subparsers.add_parser(
        "check-adapter", help="lint an adapter for vLLM, llama.cpp or PEFT before deploying",
        description="Say what the target will reject or mishandle, each with the fix: DoRA, "
                    "modules_to_save / lm_head / embedding weights, trained biases, a rank above "
                    "vLLM's --max-lora-rank (default 16), target modules the runtime does not "
                    "support, a base model that differs from the one recorded in lorakit.json "
                    "(--model), tensor dtypes, a 4-bit training base. Exit status 1 when there "
                    "is an error finding, 0 otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit check-adapter runs/demo/adapter --target vllm\n"
               "  lorakit check-adapter runs/demo/adapter --target vllm --max-lora-rank 64")
    check.add_argument("adapter", metavar="DIR", help="the adapter folder")
    check.add_argument("--target", required=True, choices=["vllm", "llamacpp", "peft"],
                       help="the runtime it will be deployed on")
    check.add_argument("--max-lora-rank", type=int, default=16, metavar="N",
                       help="vLLM's --max-lora-rank you will use (default: 16, vLLM's default)")
    check.add_argument("--model", metavar="MODEL",
                       help="the base it will run on; compared with lorakit.json's record")
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.set_defaults(func=run_check_adapter)


def _merged_gguf_flags(parser, out_metavar: str, out_help: str, *, no_check: str) -> None:
    """The flags of the commands that write the merged model as a GGUF (``export gguf``,
    ``export ollama``): --adapter (optional), --model, --out, --type, --no-check and
    :func:`_common_out_flags`."""
    parser.add_argument("--adapter", metavar="DIR",
                        help="the adapter folder (omit to export the --model base alone)")
    parser.add_argument("--model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--out", required=True, metavar=out_metavar, help=out_help)
    parser.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type of the weights (default: f16; norms stay f32)")
    parser.add_argument("--no-check", action="store_true", help=no_check)
    _common_out_flags(parser)


def _common_out_flags(parser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="keep the output when its check fails, and export even when "
                             "lorakit.json says the adapter was trained on another base")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    parser.add_argument("--prompts", metavar="FILE",
                        help="prompts for the check, one per line (default: 4 built-in)")
    parser.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                        help="greedy tokens decoded per prompt in the check (default: 16)")
    parser.add_argument("--json", action="store_true", help="also print the result as JSON")


def run_merge(args) -> int:
    """``lorakit merge --adapter DIR --out DIR``."""
    import torch

    from lorakit.errors import ConfigError
    from lorakit.export.merge import merge_to_folder

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    result = merge_to_folder(args.adapter, args.out, args.model,
                             dtype=getattr(torch, _DTYPES[args.dtype]), force=args.force,
                             overwrite=args.overwrite, prompts=_read_prompts(args.prompts),
                             max_new_tokens=args.max_new_tokens,
                             max_shard_size=args.max_shard_size,
                             by_layer={"auto": None, "on": True, "off": False}[
                                 args.parity_by_layer])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['out']} (base {result['base']}, {result['dtype']})")
    return 0


def run_export_gguf(args) -> int:
    """``lorakit export gguf``."""
    from lorakit.export.gguf import export_gguf

    result = export_gguf(args.adapter, args.out, args.model, out_type=args.type,
                         force=args.force, overwrite=args.overwrite, check=not args.no_check,
                         prompts=_read_prompts(args.prompts), max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, indent=2) if args.json else f"wrote {result['out']}")
    return 0


def run_export_gguf_lora(args) -> int:
    """``lorakit export gguf-lora``."""
    from lorakit.export.gguf import export_gguf_lora

    result = export_gguf_lora(args.adapter, args.out, args.model, base_gguf=args.base_gguf,
                              force=args.force, overwrite=args.overwrite,
                              prompts=_read_prompts(args.prompts),
                              max_new_tokens=args.max_new_tokens)
    print(json.dumps(result, indent=2) if args.json else f"wrote {result['out']}")
    return 0


def _print_findings(findings, title: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(soft_wrap=True)  # fixes stay copyable: no inserted line breaks
    style = {"error": "red", "warning": "yellow", "info": "dim"}
    if not findings:
        console.print(f"{title}: [green]no problems found[/green]")
    for f in findings:
        f = f if isinstance(f, dict) else f.__dict__
        console.print(f"{escape(title)}: [{style[f['level']]}]{f['level']}[/] "
                      f"{escape('[' + f['rule'] + ']')} {escape(f['message'])}\n"
                      f"    fix: {escape(f['fix'])}", highlight=False)


def run_check_adapter(args) -> int:
    """``lorakit check-adapter DIR --target T``: exit 1 on any error finding."""
    from dataclasses import asdict

    from lorakit.export.compat import check_adapter

    findings = check_adapter(args.adapter, args.target, max_lora_rank=args.max_lora_rank,
                             model=args.model)
    if args.json:
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        _print_findings(findings, f"{args.adapter} -> {args.target}")
    return 1 if any(f.level == "error" for f in findings) else 0


def run_export_vllm(args) -> int:
    """``lorakit export vllm --adapter NAME=DIR ...``."""
    from lorakit.errors import ConfigError
    from lorakit.export.compat import vllm_command

    adapters = {}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapter {item!r}: expected NAME=DIR, e.g. sql=runs/sql/adapter")
        if name in adapters:
            raise ConfigError(f"adapter name {name!r} given twice; names must be unique")
        adapters[name] = folder
    result = vllm_command(adapters, args.model, max_lora_rank=args.max_lora_rank)
    errors = any(f["level"] == "error" for fs in result["findings"].values() for f in fs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 1 if errors else 0
    for name, findings in result["findings"].items():
        _print_findings([f for f in findings if f["level"] != "info"], name)
    if errors:
        print("not printing the vllm command: fix the errors above first")
        return 1
    print(result["command"])
    print("# POST /v1/load_lora_adapter bodies (vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):")
    for body in result["load_lora_adapter"]:
        print(json.dumps(body))
    return 0


# ---------------------------------------------------------------------- export ollama
def _add_ollama_parser(targets) -> None:
    ollama = targets.add_parser(
        "ollama", help="a GGUF plus a Modelfile (chat template, stop tokens) for ollama create",
        description="Write FOLDER/model.gguf (the merged model, exactly as `export gguf` writes "
                    "and checks it) and FOLDER/Modelfile: FROM ./model.gguf, the chat template "
                    "translated to Ollama's Go template syntax (ChatML: SmolLM2, Qwen; Llama-3; "
                    "Mistral; Phi-3; Gemma), its default system prompt as SYSTEM, and PARAMETER "
                    "stop for the end-of-turn tokens. The translation is checked first: on "
                    "sample conversations it must render exactly what the tokenizer's "
                    "apply_chat_template renders, else nothing is written and the exit status "
                    "is 2 (unless --force). Then: ollama create NAME -f FOLDER/Modelfile.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit export ollama --adapter runs/demo/adapter --out demo-ollama/\n"
               "  ollama create demo -f demo-ollama/Modelfile && ollama run demo\n"
               "  lorakit export ollama --model smollm2-135m-instruct --out smol-ollama/")
    _merged_gguf_flags(ollama, "FOLDER", "the folder to write",
                       no_check="skip the GGUF's greedy-decoding check (the template check "
                                "stays)")
    ollama.set_defaults(func=run_export_ollama)


def run_export_ollama(args) -> int:
    """``lorakit export ollama``."""
    from lorakit.export.ollama import export_ollama

    result = export_ollama(args.adapter, args.out, args.model, out_type=args.type,
                           force=args.force, overwrite=args.overwrite, check=not args.no_check,
                           prompts=_read_prompts(args.prompts),
                           max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['gguf']} and {result['modelfile']} ({result['family']} template, "
              f"checked on {result['template_checked']} conversations)\nnext: {result['command']}")
    return 0
