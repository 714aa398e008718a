"""The fine-tuning service's options of ``lorakit serve`` (``--state-dir``,
``--max-concurrent-jobs``).

``lorakit serve`` itself belongs to ``lorakit.serve.cli`` (registered before this module, see
``lorakit/cli.py``); this module adds its options to that parser and runs the same server
with the jobs service attached, so ``serve/`` never imports ``jobs/``.
"""

from __future__ import annotations


def add_parsers(subparsers) -> None:
    """Add the fine-tuning options to the ``serve`` parser that ``lorakit.serve.cli`` made."""
    serve = subparsers.choices["serve"]
    jobs = serve.add_argument_group(
        "fine-tuning service", "OpenAI's files + fine-tuning jobs API and the web UI at /ui "
                               "(docs/service.md)")
    jobs.add_argument("--state-dir", metavar="DIR",
                      help="enable fine-tuning jobs: uploaded files, job state (SQLite), run "
                           "folders and fine-tuned adapters live here; a restarted server "
                           "resumes interrupted jobs and serves finished ones")
    jobs.add_argument("--max-concurrent-jobs", type=int, default=1, metavar="N",
                      help="jobs trained at once, each in its own worker process (default: 1)")
    serve.set_defaults(func=run_serve)


def run_serve(args) -> int:
    """``lorakit serve``, with the fine-tuning service when ``--state-dir`` is given."""
    from lorakit.serve.cli import run_serve as serve

    return serve(args, extend=_add_jobs if args.state_dir else None)


def _add_jobs(args, engine, app):
    """Attach the jobs service to the serving app; returns what stops it."""
    from pathlib import Path

    from lorakit.jobs.api import attach
    from lorakit.jobs.manager import JobManager

    spec = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    manager = JobManager(args.state_dir, engine, base_model=spec, base_name=engine.base_name,
                         max_concurrent=args.max_concurrent_jobs)
    attach(app, manager)
    print(f"lorakit serve: fine-tuning jobs in {args.state_dir}, web UI at "
          f"http://{args.host}:{args.port}/ui", flush=True)
    return manager.stop  # workers checkpoint; their jobs resume on the next start
