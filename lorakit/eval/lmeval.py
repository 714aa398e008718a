"""Standard benchmarks through EleutherAI's lm-evaluation-harness (optional: ``pip install lm-eval``).

The harness's own Hugging Face model class (``HFLM``) wraps the already-loaded model, so the
tasks run exactly as the harness runs them; the base and each adapter are switched in place
(adapters disabled / set active) between runs, with no second copy of the model.
"""

from __future__ import annotations

from typing import Sequence

from lorakit.errors import ConfigError


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(model, tokenizer, names: Sequence[str], tasks: str | Sequence[str], *,
                limit: int | None = None, batch_size: int = 8) -> dict:
    """Run lm-eval ``tasks`` for the base (``"base"``) and each adapter in ``names``.

    Returns:
        ``{name: {task: {metric: value}}}`` as the harness reports it.

    Raises:
        ConfigError: lm-eval is not installed, or a task is unknown / its data unavailable.
    """
    if not lm_eval_available():
        raise ConfigError("--lm-eval needs EleutherAI's harness: pip install lm-eval "
                          "(its tasks download their data sets on first use)")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from lorakit.eval.compare import use_model

    task_list = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not task_list:
        raise ConfigError("--lm-eval: give one or more task names, comma-separated")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out: dict[str, dict] = {}
    for name in names:
        with use_model(model, name):
            try:
                results = simple_evaluate(model=lm, tasks=task_list, limit=limit)
            except Exception as exc:  # unknown task or data that cannot be fetched offline
                raise ConfigError(f"lm-eval failed for tasks {task_list}: {type(exc).__name__}: "
                                  f"{exc}") from None
        out[name] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                     for task, metrics in (results or {}).get("results", {}).items()}
    return out
