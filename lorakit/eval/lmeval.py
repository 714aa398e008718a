"""Standard benchmarks through EleutherAI's lm-evaluation-harness (optional: ``pip install lm-eval``).

The harness's own Hugging Face model class (``HFLM``) wraps the already-loaded model, so the
tasks run exactly as the harness runs them; the base and each adapter are switched in place
(adapters disabled / set active) between runs, with no second copy of the model.

A task is a harness task name (``hellaswag``) or the path of a task YAML of your own (e.g.
over a local JSONL with ``dataset_path: json``): its folder is added to the harness's
include path and the YAML's ``task:`` name is run. With only YAML paths the harness's
built-in task index is not read (it is large).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lorakit.errors import ConfigError


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    """Raise the clear error when lm-evaluation-harness is not installed."""
    if not lm_eval_available():
        raise ConfigError("--lm-eval needs EleutherAI's lm-evaluation-harness, which is not "
                          "installed: pip install lm-eval (its built-in tasks download their "
                          "data sets on first use; a task YAML over local files does not)")


def _task_name(path: Path) -> str:
    """The ``task:`` name a harness task YAML declares (read as text: task YAMLs may hold
    ``!function`` tags a plain YAML loader refuses)."""
    import re

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"--lm-eval: cannot read task file {path}: {exc}") from None
    match = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", text, re.M)
    if not match:
        raise ConfigError(f"--lm-eval: {path} has no top-level `task: NAME` line (an "
                          f"lm-evaluation-harness task YAML)")
    return match.group(1)


def _entries(tasks: str | Sequence[str]) -> list[str]:
    return [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]


def _resolve_tasks(tasks: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """``(task names, include paths)`` for the harness."""
    entries = _entries(tasks)
    if not entries:
        raise ConfigError("--lm-eval: give one or more task names, comma-separated")
    names, include = [], []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise ConfigError(f"--lm-eval: task file {entry} does not exist")
            names.append(_task_name(path))
            folder = str(path.resolve().parent)
            if folder not in include:
                include.append(folder)
        else:
            names.append(entry)
    return names, include


def run_lm_eval(model, tokenizer, names: Sequence[str], tasks: str | Sequence[str], *,
                limit: int | None = None, batch_size: int = 8) -> dict:
    """Run lm-eval ``tasks`` for the base (``"base"``) and each adapter in ``names``.

    Returns:
        ``{name: {task: {metric: value}}}`` as the harness reports it.

    Raises:
        ConfigError: lm-eval is not installed, or a task is unknown / its data unavailable.
    """
    require_lm_eval()
    task_list, include = _resolve_tasks(tasks)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lorakit.eval.adapters import use_model

    builtin = len(task_list) - sum(1 for t in _entries(tasks) if t.endswith((".yaml", ".yml")))
    manager = TaskManager(include_path=include or None, include_defaults=builtin > 0)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out: dict[str, dict] = {}
    for name in names:
        with use_model(model, name):
            try:
                results = simple_evaluate(model=lm, tasks=task_list, limit=limit,
                                          task_manager=manager, log_samples=False)
            except Exception as exc:  # unknown task or data that cannot be fetched offline
                raise ConfigError(f"lm-eval failed for tasks {task_list}: {type(exc).__name__}: "
                                  f"{exc}") from None
        out[name] = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                     for task, metrics in (results or {}).get("results", {}).items()}
    return out
