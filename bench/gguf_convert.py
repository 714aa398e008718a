"""The first load of a GGUF: lorakit's one-pass conversion against transformers' GGUF loader.

Both convert the embedded SmolLM2-135M-Instruct (Q4_1) into a float32 Hugging Face folder, in
the same process, alternated for ``--rounds`` rounds (the first round of each pays its imports);
then the two folders are compared file by file (JSON equal, every tensor bit-equal; a tied
model's one matrix is named lm_head.weight by transformers' save, model.embed_tokens.weight by
lorakit). Each side's first load end to end (``load_model`` into an empty cache, a fresh
interpreter) is timed too.

    .venv/bin/python bench/gguf_convert.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST_LOAD = """
import time, sys
start = time.perf_counter()
from lorakit.models import cache
if sys.argv[1] == "transformers":
    cache._convert_gguf = cache._convert_gguf_transformers
from lorakit.models.load import load_model
load_model("smollm2-135m-instruct")
print(time.perf_counter() - start)
"""


def _same(a: Path, b: Path) -> dict:
    import safetensors.torch
    import torch

    names = sorted(p.name for p in b.iterdir())
    files_equal = names == sorted(p.name for p in a.iterdir())
    json_equal = all(json.loads((a / n).read_text()) == json.loads((b / n).read_text())
                     for n in names if n.endswith(".json"))
    sa = safetensors.torch.load_file(a / "model.safetensors")
    sb = safetensors.torch.load_file(b / "model.safetensors")
    if "lm_head.weight" in sb and "lm_head.weight" not in sa:
        sb["model.embed_tokens.weight"] = sb.pop("lm_head.weight")
    tensors_equal = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return {"same_files": files_equal, "json_equal": json_equal, "tensors_equal": tensors_equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench/results/gguf_convert.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lorakit.models import cache, gguf_convert
    from lorakit.models.load import resolve_spec

    gguf = resolve_spec("smollm2-135m-instruct").path
    sides = {"lorakit": gguf_convert.convert, "transformers": cache._convert_gguf_transformers}
    seconds = {name: [] for name in sides}
    folders = {}
    for _ in range(args.rounds):
        for name, convert in sides.items():
            out = Path(tempfile.mkdtemp(prefix=f"conv-{name}-"))
            start = time.perf_counter()
            convert(gguf, out)
            seconds[name].append(round(time.perf_counter() - start, 2))
            folders[name] = out
    first_load = {}
    for name in sides:
        env = dict(os.environ, LORAKIT_CACHE_DIR=tempfile.mkdtemp(prefix="cache-"))
        done = subprocess.run([sys.executable, "-c", FIRST_LOAD, name], env=env, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        first_load[name] = round(float(done.stdout.strip().splitlines()[-1]), 2)
    result = {"gguf": gguf.name, "convert_seconds": seconds, "first_load_seconds": first_load,
              "ratio_first_load": round(first_load["transformers"] / first_load["lorakit"], 2),
              "ratio_convert_best": round(min(seconds["transformers"]) / min(seconds["lorakit"]), 2),
              **_same(folders["lorakit"], folders["transformers"]), "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
