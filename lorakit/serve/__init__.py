"""Serving many LoRA adapters over one base model: the inference server alone (it imports
nothing from ``train/``, ``eval/`` or ``jobs/``; the fine-tuning service in ``lorakit.jobs``
mounts itself on this server's app).

- ``engine.py``: continuous batching with a KV cache; rows of one batch use different adapters
  (``lorakit.mixed_batch``); an LRU of resident adapters with hot load/unload.
- ``adapters.py``: safe adapter paths under ``--adapter-root``; checks against the base.
- ``api.py``: the OpenAI-compatible FastAPI app (``create_app``) and ``ServerThread``.
- ``protocol.py``: request bodies, OpenAI's response, stream-chunk and error shapes.
- ``routes/``: the routers the app mounts (models and adapters, completions, health/metrics).
- ``auth.py``: API keys and their owners (``--api-key``, ``--keys-file``), the one key check,
  and who may use / unload each adapter.
- ``limits.py``: body-size limits and the key check before the body (a pure ASGI middleware),
  the request deadline.
- ``metrics.py``: Prometheus metrics; ``monitor.py``: SQLite request log and drift.
- ``cli.py``: ``lorakit serve`` and ``lorakit monitor drift``.

Nothing heavy is imported here: ``from lorakit.serve.engine import Engine`` when needed.
"""
