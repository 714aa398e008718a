"""The inference server's routes, one router per area, mounted by
:func:`lorakit.serve.api.create_app`:

- ``models.py``: ``GET /v1/models``, ``POST /v1/load_lora_adapter``, ``/v1/unload_lora_adapter``.
- ``completions.py``: ``POST /v1/completions`` and ``/v1/chat/completions`` (SSE streaming).
- ``health.py``: ``GET /health`` and ``GET /metrics`` (open, as in vLLM).

Handlers reach the engine, metrics and request log through ``request.app.state``.
"""
