"""Fine-tuning as a service, on top of ``train/``, ``eval/`` and ``serve/``: OpenAI's files and
fine-tuning jobs API plus a web UI, added to ``lorakit serve`` by ``--state-dir``.

- ``store.py``: SQLite state (files, jobs, events, checkpoints).
- ``protocol.py``: the job request, its hyperparameters and ``lorakit`` options; OpenAI's JSON
  shapes of the rows.
- ``manager.py``: :class:`JobManager`, worker processes, scheduling, crash-safe resume.
- ``worker.py``: one job's training process (``python -m lorakit.jobs.worker``).
- ``service.py``: upload, create, cancel, delete: what the routes and the UI both call.
- ``api.py``: the ``/v1/files`` and ``/v1/fine_tuning`` routes; :func:`attach` mounts them (and
  the UI) on the serving app.
- ``ui/``: the ``/ui`` pages (Jinja2 templates, one script).
- ``cli.py``: the ``--state-dir`` options of ``lorakit serve``.

Nothing heavy is imported here.
"""
