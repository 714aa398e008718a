"""Serving many LoRA adapters over one base model.

- ``engine.py``: continuous batching with a KV cache; rows of one batch use different adapters
  (``lorakit.mixed_batch``); an LRU of resident adapters with hot load/unload.
- ``adapters.py``: safe adapter paths under ``--adapter-root``; checks against the base.
- ``api.py``: the OpenAI-compatible FastAPI app (``create_app``) and ``ServerThread``.
- ``metrics.py``: Prometheus metrics; ``monitor.py``: SQLite request log and drift.
- ``cli.py``: ``lorakit serve`` and ``lorakit monitor drift``.

Nothing heavy is imported here: ``from lorakit.serve.engine import Engine`` when needed.
"""
