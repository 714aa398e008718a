"""``GET /v1/models`` and vLLM's runtime adapter routes (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, same request shapes and plain-text answers).

Ownership (``lorakit.serve.auth``, docs/serve.md "Owners"): a caller lists and uses the base,
the ``--adapter`` adapters and its own; an adapter it loads is its own (on a server with a
keys file); it unloads only its own (admin keys: any). Another owner's adapter answers exactly
as a name that does not exist.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from lorakit.errors import AdapterError
from lorakit.serve.auth import can_remove, can_use, caller_of
from lorakit.serve.engine import LoadTimeout, ModelNotFound
from lorakit.serve.protocol import APIError, LoadLoraAdapterRequest, UnloadLoraAdapterRequest

router = APIRouter(prefix="/v1")

RESERVED_PREFIX = "ft:"  # fine-tuned models' names (lorakit.jobs): no runtime load may take one
LOAD_TIMEOUT_S = 60.0


@router.get("/models")
async def list_models(http: HTTPRequest):
    """The base and every registered adapter this caller may see."""
    engine, caller = http.app.state.engine, caller_of(http)
    base = {"id": engine.base_name, "object": "model", "created": engine.created,
            "owned_by": "lorakit", "root": engine.base_name, "parent": None,
            "max_model_len": engine.max_model_len}
    data = [base]
    for name in engine.adapters():
        entry = engine.adapter(name)
        if entry is None or not can_use(entry, caller):
            continue
        data.append({"id": name, "object": "model", "created": engine.created,
                     "owned_by": entry.owner or "lorakit", "root": str(entry.path),
                     "parent": engine.base_name, "max_model_len": engine.max_model_len})
    return {"object": "list", "data": data}


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, http: HTTPRequest):
    engine, caller = http.app.state.engine, caller_of(http)
    if not body.lora_name or not body.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    if body.lora_name.startswith(RESERVED_PREFIX):
        raise APIError(400, f"adapter names starting with {RESERVED_PREFIX!r} are reserved for "
                            f"fine-tuned models", param="lora_name")
    if body.lora_name == engine.base_name or engine.adapter(body.lora_name) is not None:
        # the same answer whoever owns it: a taken name says nothing about its owner
        raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.")
    owner = caller.owner if http.app.state.keys.tenants else None
    try:
        await run_in_threadpool(engine.add_adapter, body.lora_name, body.lora_path,
                                check_root=True, owner=owner, timeout=LOAD_TIMEOUT_S)
    except LoadTimeout as exc:
        raise APIError(503, str(exc), "server_error") from None
    except AdapterError as exc:
        raise APIError(400, str(exc)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, http: HTTPRequest):
    engine, caller = http.app.state.engine, caller_of(http)
    not_found = APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.",
                         "not_found_error")
    if body.lora_name == engine.base_name:
        raise APIError(400, "the base model cannot be unloaded")
    entry = engine.adapter(body.lora_name)
    if entry is None or not can_use(entry, caller):
        raise not_found
    if not can_remove(entry, caller):
        raise APIError(403, f"adapter '{body.lora_name}' is served by the server's "
                            f"configuration (--adapter): only an admin key may unload it",
                       "permission_error")
    try:
        engine.remove_adapter(body.lora_name, slot=entry.slot)
    except ModelNotFound:
        raise not_found from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
