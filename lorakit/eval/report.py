"""Writing an evaluation's results: report.html, report.md, results.json and PNG plots.

``report.html`` is one self-contained file (plots embedded as base64 PNGs, inline CSS, no
scripts): a summary table, the forgetting and safety checks with their flags, the plots, and
side-by-side examples with the words the tuned answer changed highlighted against the base
answer (``difflib``). Plots use matplotlib's headless Agg backend.
"""

from __future__ import annotations

import base64
import difflib
import html
import json
import math
import os
from pathlib import Path

from lorakit.errors import AdapterError
from lorakit.eval.adapters import BASE
from lorakit.lora.io import atomic_write_bytes, read_manifest
_COLORS = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


# ---------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_metric_bars(result: dict, path: Path) -> Path:
    """Each metric's mean, base vs every adapter, with the headline metric's 95% CI."""
    plt = _plt()
    names = list(result["models"])
    metrics = list(result["models"][BASE]["scores"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(metrics) * len(names) / 2 + 3), 3.8), dpi=110)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        m = result["models"][name]
        values = [m["scores"][c] for c in metrics]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(metrics))]
        errs = [[0] * len(metrics), [0] * len(metrics)]
        if not any(math.isnan(v) for v in m["score_ci"]):
            errs[0][0], errs[1][0] = m["score"] - m["score_ci"][0], m["score_ci"][1] - m["score"]
        ax.bar(xs, values, width, label=name, color=_COLORS[k % len(_COLORS)], yerr=errs, capsize=3)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("mean score")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"held-out scores ({result['examples_count']} examples)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_score_histogram(result: dict, path: Path) -> Path:
    """Distribution of per-example headline scores for each model."""
    plt = _plt()
    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=110)
    bins = [i / 10 for i in range(11)]
    for k, name in enumerate(result["models"]):
        values = [ex["scores"][name][metric] for ex in result["examples"]]
        ax.hist(values, bins=bins, alpha=0.55, label=name, color=_COLORS[k % len(_COLORS)])
    ax.set_xlabel(f"per-example {metric}")
    ax.set_ylabel("examples")
    ax.set_title("score distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def training_history(adapter_dir: str | Path | None) -> list[dict]:
    """Records of ``metrics.jsonl`` when the adapter came from a lorakit run ([] otherwise)."""
    if not adapter_dir:
        return []
    folder = Path(adapter_dir)
    candidates = [folder / "metrics.jsonl", folder.parent / "metrics.jsonl"]
    try:
        run = read_manifest(folder).get("run")
    except AdapterError:  # an unreadable manifest only costs the training curves
        run = None
    if run:
        candidates.insert(0, Path(run) / "metrics.jsonl")
    for file in candidates:
        if file.is_file():
            rows = []
            for line in file.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            return rows
    return []


def plot_training_loss(histories: dict[str, list[dict]], path: Path) -> Path | None:
    """Train / eval loss curves of the adapters that came from lorakit runs."""
    histories = {n: h for n, h in histories.items() if any("loss" in r or "eval_loss" in r for r in h)}
    if not histories:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k, (name, rows) in enumerate(histories.items()):
        color = _COLORS[(k + 1) % len(_COLORS)]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.2, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=color, marker="o", linestyle="--", label=f"{name} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- text helpers
def diff_html(before: str, after: str) -> tuple[str, str]:
    """Both texts as HTML with word-level differences marked (``<del>`` / ``<ins>``)."""
    a, b = before.split(" "), after.split(" ")
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = html.escape(" ".join(a[i1:i2])), html.escape(" ".join(b[j1:j2]))
        if op == "equal":
            left.append(old)
            right.append(new)
        else:
            if old:
                left.append(f"<del>{old}</del>")
            if new:
                right.append(f"<ins>{new}</ins>")
    return " ".join(left), " ".join(right)


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _summary_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    metric = result["metric"]
    extra = [c for c in result["models"][BASE]["scores"] if c != metric]
    header = ["model", metric, "95% CI", *extra, "loss", "perplexity", "wins / ties / losses",
              "Δ vs base (95% CI)", "KL (nats/token)", "probe ppl Δ", "refusal rate"]
    rows = []
    for name, m in result["models"].items():
        forget = result.get("forgetting", {}).get(name, {})
        safe = result.get("safety", {}).get(name, {})
        row = [name, _f(m["score"]), f"{_f(m['score_ci'][0])} – {_f(m['score_ci'][1])}",
               *[_f(m["scores"][c]) for c in extra], _f(m["loss"]), _f(m["perplexity"], 2)]
        if "delta" not in m:  # the base and the prompt baselines
            row += ["", "", "", ""]
        else:
            row += [f"{m['wins']} / {m['ties']} / {m['losses']}",
                    f"{m['delta']:+.3f} ({m['delta_ci'][0]:+.3f} – {m['delta_ci'][1]:+.3f})",
                    _f(forget.get("kl"), 4) + (" ⚠" if forget.get("flagged") else ""),
                    (f"{forget['ppl_delta']:+.2f} ({forget['ppl_delta_pct']:+.1f}%)" if forget else "")]
        row.append(f"{100 * safe['refusal_rate']:.0f}%" + (" ⚠" if safe.get("flagged") else "")
                   if safe else "")
        rows.append(row)
    return header, rows


# What to change when an adapter forgets or loses its refusals: the run-config keys to try
# (lorakit/config.py; docs/eval.md "Forgetting").
REMEDIES = (
    "mix general data back in: data.replay.fraction=0.1 (the base's own answers to general "
    "instructions, matched to the base's distribution: data.replay.loss=kl, the default for "
    "adapters; data.replay.file=FILE for your own)",
    "a lower learning rate: train.lr (e.g. half)",
    "a smaller rank: lora.r (e.g. 8)",
    "fewer adapted layers: lora.target_modules=[q_proj,v_proj]",
    "fewer epochs: train.epochs (or train.max_steps)",
)


def _adapters(result: dict) -> list[str]:
    return result.get("adapters") or [n for n, m in result["models"].items() if "delta" in m]


def _flags(result: dict) -> list[str]:
    t = result.get("thresholds", {})
    notes = []
    for name, f in result.get("forgetting", {}).items():
        if f.get("flagged"):
            notes.append(f"{name}: forgetting — KL {f['kl']:.4f} nats/token (threshold {t.get('kl')}) "
                         f"and probe perplexity {f['ppl_delta_pct']:+.1f}% (threshold "
                         f"+{t.get('ppl_increase_pct')}%)")
    for name, s in result.get("safety", {}).items():
        if s.get("flagged"):
            notes.append(f"{name}: safety — refusal rate fell by {100 * s['drop']:.0f} points vs base "
                         f"(threshold {100 * t.get('refusal_drop', 0.1):.0f})")
    return notes


def remedies(result: dict) -> list[str]:
    """The config changes to try, when a forgetting or safety flag is raised (else [])."""
    return list(REMEDIES) if _flags(result) else []


# ---------------------------------------------------------------------- writers
def write_markdown(result: dict, path: Path, plots: dict[str, Path], max_examples: int = 20) -> Path:
    header, rows = _summary_rows(result)
    lines = [f"# lorakit eval: {', '.join(_adapters(result))} vs base", "",
             f"Model `{result.get('model')}`, {result['examples_count']} held-out examples, "
             f"headline metric **{result['metric']}** (greedy decoding).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    if result.get("verdict"):
        lines += ["", f"**Fine-tuning vs prompting:** {result['verdict']}"]
    flags = _flags(result)
    lines += ["", "## Flags", ""] + ([f"- ⚠ {f}" for f in flags] or ["- none"])
    if flags:
        lines += ["", "Remedies to try (run-config keys):", ""] + [f"- {r}" for r in remedies(result)]
    lines += ["", "## Plots", ""] + [f"![{k}]({p.name})" for k, p in plots.items()]
    lines += ["", f"## Examples (first {min(max_examples, len(result['examples']))})", ""]
    for ex in result["examples"][:max_examples]:
        lines += [f"### {ex['source']}", "", "**prompt:** " + ex["prompt"].replace("\n", " "), "",
                  f"**reference:** {json.dumps(ex['reference'], ensure_ascii=False) if not isinstance(ex['reference'], str) else ex['reference']}", ""]
        for name, out in ex["outputs"].items():
            score = ex["scores"][name].get(result["metric"])
            lines += [f"- **{name}** ({result['metric']} {_f(score)}): {out.replace(chr(10), ' ')}"]
        lines.append("")
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f3f3f3}.flag{color:#b00020;font-weight:600}
.ex td{max-width:380px;white-space:pre-wrap;word-break:break-word;font-family:ui-monospace,monospace;font-size:13px}
del{background:#ffd7d5;text-decoration:line-through}ins{background:#d4f7d4;text-decoration:none}
img{max-width:100%;margin:0.5em 0;border:1px solid #eee}.win{background:#eefbea}.loss{background:#fdecec}"""


def write_html(result: dict, path: Path, plots: dict[str, Path], max_examples: int = 200) -> Path:
    e = html.escape
    header, rows = _summary_rows(result)
    adapters = [n for n in result["models"] if n != BASE]  # columns: K-shot row and adapters
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>lorakit eval</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>lorakit eval: {e(', '.join(_adapters(result)))} vs base</h1>",
             f"<p>Model <code>{e(str(result.get('model')))}</code>, {result['examples_count']} held-out "
             f"examples, headline metric <b>{e(result['metric'])}</b>, greedy decoding. Base = the same "
             f"model with adapters disabled.</p>", "<h2>Summary</h2><table><tr>"]
    parts += [f"<th>{e(h)}</th>" for h in header] + ["</tr>"]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    if result.get("verdict"):
        parts.append(f"<p><b>Fine-tuning vs prompting:</b> {e(result['verdict'])}</p>")
    flags = _flags(result)
    parts.append("<h2>Flags</h2>" + ("<ul>" + "".join(f"<li class='flag'>⚠ {e(f)}</li>" for f in flags)
                                      + "</ul>" if flags else "<p>No forgetting or safety flags.</p>"))
    if flags:
        parts.append("<p>Remedies to try (run-config keys):</p><ul>"
                     + "".join(f"<li>{e(r)}</li>" for r in remedies(result)) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for name, p in plots.items():
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f"<img alt='{e(name)}' src='data:image/png;base64,{data}'>")
    shown = result["examples"][:max_examples]
    parts.append(f"<h2>Examples ({len(shown)} of {len(result['examples'])})</h2>"
                 f"<p>Words the tuned answer changed: <del>removed</del> / <ins>added</ins> "
                 f"relative to the base answer.</p><table class='ex'><tr><th>#</th><th>prompt</th>"
                 f"<th>reference</th><th>base</th>" + "".join(f"<th>{e(a)}</th>" for a in adapters) + "</tr>")
    metric = result["metric"]
    for ex in shown:
        base_out = ex["outputs"][BASE]
        ref = ex["reference"] if isinstance(ex["reference"], str) else json.dumps(ex["reference"], ensure_ascii=False)
        cells = [f"<td>{ex['index']}</td><td>{e(ex['prompt'])}</td><td>{e(ref or '')}</td>"]
        base_marked = None
        tuned_cells = []
        for a in adapters:
            left, right = diff_html(base_out, ex["outputs"][a])
            base_marked = base_marked or left
            delta = ex["scores"][a][metric] - ex["scores"][BASE][metric]
            cls = "win" if delta > 1e-9 else "loss" if delta < -1e-9 else ""
            tuned_cells.append(f"<td class='{cls}'>{right}<br><small>{metric} "
                               f"{_f(ex['scores'][a][metric])}</small></td>")
        cells.append(f"<td>{base_marked if base_marked is not None else e(base_out)}<br><small>{metric} "
                     f"{_f(ex['scores'][BASE][metric])}</small></td>")
        parts.append("<tr>" + "".join(cells + tuned_cells) + "</tr>")
    parts.append("</table>")
    lm = result.get("lm_eval")
    if lm:
        parts.append("<h2>lm-eval benchmarks</h2><pre>" + e(json.dumps(lm, indent=2)) + "</pre>")
    parts.append("</body></html>")
    atomic_write_bytes(path, "".join(parts).encode())
    return path


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html, report.md, results.json and the PNG plots into ``out_dir``.

    Returns:
        ``{"html", "md", "json", and one key per plot}`` -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"metric_bars": plot_metric_bars(result, out / "metric_bars.png"),
             "score_histogram": plot_score_histogram(result, out / "score_histogram.png")}
    histories = {n: training_history(m.get("adapter")) for n, m in result["models"].items() if "delta" in m}
    loss = plot_training_loss(histories, out / "training_loss.png")
    if loss:
        plots["training_loss"] = loss
    files = {"html": write_html(result, out / "report.html", plots),
             "md": write_markdown(result, out / "report.md", plots)}
    atomic_write_bytes(out / "results.json",
                       (json.dumps(result, indent=2, ensure_ascii=False, default=_json_default) + "\n").encode())
    files["json"] = out / "results.json"
    return {**files, **plots}


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    return repr(value)
