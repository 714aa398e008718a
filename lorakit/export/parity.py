"""The parity gate: does an exported model compute what the adapter on its base computes?

On a fixed set of prompts (chat-templated when the tokenizer has a template), the reference
model greedily decodes ``max_new_tokens`` tokens; both models are then run teacher-forced on
prompt + that continuation and compared position by position (:func:`parity_report`), and
the candidate decodes greedily on its own to see whether it writes the same tokens.

Thresholds depend on the dtype the exported weights are stored in (rounding a weight to
bf16 keeps 8 significant bits, fp16 11, so 16-bit exports cannot match to float32
precision). The candidate always computes in float32, so what is measured is the merge and
the rounding of the written weights, not the arithmetic of some runtime. Values are the
measured numbers on SmolLM2-135M with a margin of about 10x (see docs/export.md):

=========  ==================  =========  ================
dtype      max |logit diff|    mean KL    argmax agreement
=========  ==================  =========  ================
float32    <= 1e-2             <= 1e-6    >= 0.99
float16    (reported)          <= 1e-3    >= 0.97
bfloat16   (reported)          <= 1e-2    >= 0.90
=========  ==================  =========  ================
"""

from __future__ import annotations

import torch

from lorakit.models.layerwise import input_device
from lorakit.models.modules import kv_cache_argument, left_padded, positions_from_mask

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a SQL query that returns the ten most recent orders.",
    "Explain in one sentence what a low-rank adapter is.",
    "List three colours of the rainbow.",
]

THRESHOLDS = {
    "float32": {"max_abs_logit_diff": 1e-2, "mean_kl": 1e-6, "argmax_agreement": 0.99},
    "float16": {"max_abs_logit_diff": None, "mean_kl": 1e-3, "argmax_agreement": 0.97},
    "bfloat16": {"max_abs_logit_diff": None, "mean_kl": 1e-2, "argmax_agreement": 0.90},
}


def encode_prompts(tokenizer, prompts: list[str] | None = None) -> list[torch.Tensor]:
    """Token ids (1, T) of each prompt: the chat template with a generation prompt when the
    tokenizer has one, else the raw text with the tokenizer's special tokens."""
    from lorakit.data.tokenize import prompt_ids

    out = []
    for prompt in prompts or DEFAULT_PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        if not ids:
            from lorakit.errors import ExportError

            raise ExportError(f"the tokenizer turns the parity prompt {prompt!r} into no tokens "
                              f"at all; pass prompts it can encode with --prompts FILE")
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


@torch.no_grad()
def parity_report(model_a, model_b, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> dict:
    """Compare two causal LMs' next-token predictions on the same tokens.

    Args:
        model_a: the reference (e.g. the adapter over its 4-bit base).
        model_b: the candidate (e.g. the merged model).
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq); positions where it is 0 are left out.

    Returns:
        ``{"max_abs_logit_diff", "mean_kl", "greedy_agreement", "positions"}``: the largest
        |logit_a - logit_b|, the mean KL(p_a || p_b) in nats per position, and the fraction of
        positions whose argmax token agrees.
    """
    device_a, device_b = input_device(model_a), input_device(model_b)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits_a = model_a(input_ids=input_ids.to(device_a),
                       **{k: v.to(device_a) for k, v in kwargs.items()}).logits.float().cpu()
    logits_b = model_b(input_ids=input_ids.to(device_b),
                       **{k: v.to(device_b) for k, v in kwargs.items()}).logits.float().cpu()
    keep = torch.ones(input_ids.shape, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool().cpu()
    a, b = logits_a[keep].double(), logits_b[keep].double()  # (positions, vocab)
    logp_a, logp_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (positions,)
    return {
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "greedy_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "positions": int(keep.sum()),
    }


@torch.no_grad()
def greedy_tokens(model, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """``max_new_tokens`` greedy tokens after ``input_ids`` (1, T); no stop at EOS, so two
    models are compared over the same number of steps. Recomputes the whole sequence each
    step (no KV cache): a few dozen short forwards, and no dependence on cache APIs."""
    ids = input_ids.to(input_device(model))
    tokens = []
    for _ in range(max_new_tokens):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(nxt))
        ids = torch.cat([ids, nxt], dim=1)
    return tokens


def _forward(model, ids, mask, past=None, cache_arg: str | None = None):
    """One forward of a left-padded batch (positions from the mask, so a row computes what it
    computes alone), KV cache kept."""
    device = input_device(model)
    positions = positions_from_mask(mask)[:, -ids.shape[1]:]
    cache = {} if past is None else {cache_arg or kv_cache_argument(model): past}
    return model(input_ids=ids.to(device), attention_mask=mask.to(device),
                 position_ids=positions.to(device), use_cache=True, **cache)


@torch.no_grad()
def greedy_batch(model, prompt_ids: list[torch.Tensor], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's ``max_new_tokens`` greedy tokens, every prompt decoded in one batch with a
    KV cache: ``max_new_tokens`` forwards in all, however many prompts (what makes the gate
    affordable for a model run layer by layer, where a forward reads every weight). No stop at
    EOS, so two models are compared over the same number of steps."""
    ids, mask, _ = left_padded(p[0].tolist() for p in prompt_ids)
    cache_arg = kv_cache_argument(model)
    out = _forward(model, ids, mask)
    tokens = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True).cpu()  # (B, 1)
        tokens.append(nxt)
        if step + 1 < max_new_tokens:
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = _forward(model, nxt, mask, getattr(out, cache_arg), cache_arg)
    del out
    if not tokens:
        return [[] for _ in prompt_ids]
    return torch.cat(tokens, dim=1).tolist()


@torch.no_grad()
def model_outputs(model, prompt_ids: list[torch.Tensor], max_new_tokens: int = 16,
                  follow: list[dict] | None = None) -> list[dict]:
    """What :func:`compare` needs of one model, so that two models never have to be in memory
    together: per prompt its own ``max_new_tokens`` greedy tokens and its float32 logits over
    the teacher-forced sequence (prompt + the reference's continuation: its own when
    ``follow`` is None, else ``follow``'s, the reference's outputs).

    The prompts run as one left-padded batch (:func:`greedy_batch`, then one teacher-forced
    forward): ``max_new_tokens + 1`` forwards per model.

    Returns:
        ``[{"tokens": [int], "full": (1, T) ids, "logits": (T, vocab) float32}]``.
    """
    tokens = greedy_batch(model, prompt_ids, max_new_tokens)
    if follow is None:
        fulls = [torch.cat([ids, torch.tensor([t], dtype=torch.long)], dim=1)
                 for ids, t in zip(prompt_ids, tokens)]
    else:
        fulls = [f["full"] for f in follow]
    ids, mask, _ = left_padded(f[0].tolist() for f in fulls)
    logits = _forward(model, ids, mask).logits.float().cpu()
    return [{"tokens": t, "full": full, "logits": logits[row, ids.shape[1] - full.shape[1]:]}
            for row, (t, full) in enumerate(zip(tokens, fulls))]


def compare_outputs(reference: list[dict], candidate: list[dict]) -> dict:
    """:func:`compare`'s report from two :func:`model_outputs` (the candidate's computed with
    ``follow=reference``)."""
    max_abs, kl_sum, agree_sum, positions, matches, prefix = 0.0, 0.0, 0.0, 0, 0, 0.0
    for ref, cand in zip(reference, candidate):
        a, b = ref["logits"].double(), cand["logits"].double()  # (positions, vocab)
        logp_a, logp_b = a.log_softmax(-1), b.log_softmax(-1)
        kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)
        n = a.shape[0]
        max_abs = max(max_abs, (a - b).abs().max().item())
        kl_sum += kl.mean().item() * n
        agree_sum += (a.argmax(-1) == b.argmax(-1)).float().mean().item() * n
        positions += n
        ref_tokens, cand_tokens = ref["tokens"], cand["tokens"]
        matches += ref_tokens == cand_tokens
        common = next((i for i, (x, y) in enumerate(zip(ref_tokens, cand_tokens)) if x != y),
                      len(ref_tokens))
        prefix += common / max(1, len(ref_tokens))
    count = max(1, len(reference))
    return {"max_abs_logit_diff": max_abs, "mean_kl": kl_sum / max(1, positions),
            "argmax_agreement": agree_sum / max(1, positions),
            "greedy_match": matches / count, "greedy_token_agreement": prefix / count,
            "positions": positions, "prompts": len(reference)}


@torch.no_grad()
def compare(reference, candidate, prompt_ids: list[torch.Tensor],
            max_new_tokens: int = 16) -> dict:
    """Parity of ``candidate`` against ``reference`` over several prompts.

    Returns:
        ``{"max_abs_logit_diff", "mean_kl", "argmax_agreement", "greedy_match",
        "greedy_token_agreement", "positions", "prompts"}``: the first three over every
        teacher-forced position (prompt + the reference's continuation); ``greedy_match`` the
        fraction of prompts whose free-running greedy continuations are identical,
        ``greedy_token_agreement`` the mean fraction of continuation tokens before the two
        first differ. (:func:`model_outputs` + :func:`compare_outputs` compute the same one
        model at a time.)
    """
    ref = model_outputs(reference, prompt_ids, max_new_tokens)
    return compare_outputs(ref, model_outputs(candidate, prompt_ids, max_new_tokens, follow=ref))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def failures(report: dict, dtype: torch.dtype) -> list[str]:
    """The thresholds of ``dtype`` that ``report`` misses, as readable strings (empty: pass)."""
    limits = THRESHOLDS[dtype_name(dtype)]
    bad = []
    for key in ("max_abs_logit_diff", "mean_kl"):
        if limits[key] is not None and not report[key] <= limits[key]:  # NaN fails too
            bad.append(f"{key} {report[key]:.3g} > {limits[key]:g}")
    if not report["argmax_agreement"] >= limits["argmax_agreement"]:
        bad.append(f"argmax_agreement {report['argmax_agreement']:.3f} < "
                   f"{limits['argmax_agreement']:g}")
    return bad


def print_table(rows: list[tuple[str, dict, bool]], dtype: torch.dtype, console=None) -> None:
    """Print one row per comparison: (label, report, gated?)."""
    from rich.console import Console
    from rich.table import Table

    limits = THRESHOLDS[dtype_name(dtype)]
    table = Table(title=f"parity of the exported model ({dtype_name(dtype)} weights)",
                  title_justify="left")
    for col in ("compared with", "max |logit diff|", "mean KL (nats)", "argmax agree",
                "greedy match", "greedy tokens", "result"):
        table.add_column(col, justify="left" if col == "compared with" else "right")
    for label, report, gated in rows:
        bad = failures(report, dtype)
        result = ("[red]FAIL[/red]" if bad else "[green]pass[/green]") if gated else "info"
        table.add_row(label, f"{report['max_abs_logit_diff']:.2e}", f"{report['mean_kl']:.2e}",
                      f"{report['argmax_agreement']:.3f}", f"{report['greedy_match']:.2f}",
                      f"{report['greedy_token_agreement']:.3f}", result)
    console = console or Console(stderr=True)
    console.print(table)
    shown = ", ".join(f"{k} {'<=' if k != 'argmax_agreement' else '>='} {v:g}"
                      for k, v in limits.items() if v is not None)
    console.print(f"thresholds for {dtype_name(dtype)}: {shown} ({report['prompts']} prompts, "
                  f"{report['positions']} positions)", style="dim", highlight=False)
