"""``GET /v1/models`` and vLLM's runtime adapter routes (``/v1/load_lora_adapter``,
``/v1/unload_lora_adapter``, same request shapes and plain-text answers)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from lorakit.errors import AdapterError
from lorakit.serve.engine import ModelNotFound
from lorakit.serve.protocol import APIError, LoadLoraAdapterRequest, UnloadLoraAdapterRequest

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(http: HTTPRequest):
    """The base and every registered adapter this caller may see."""
    engine, visible = http.app.state.engine, http.app.state.model_visible
    owner = getattr(http.state, "owner", None)
    base = {"id": engine.base_name, "object": "model", "created": engine.created,
            "owned_by": "lorakit", "root": engine.base_name, "parent": None,
            "max_model_len": engine.max_model_len}
    data = [base] + [{"id": name, "object": "model", "created": engine.created,
                      "owned_by": "lorakit", "root": str(path), "parent": engine.base_name,
                      "max_model_len": engine.max_model_len}
                     for name, path in engine.adapters().items() if visible(owner, name)]
    return {"object": "list", "data": data}


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, http: HTTPRequest):
    engine = http.app.state.engine
    if not body.lora_name or not body.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    if body.lora_name in engine.adapters():
        raise APIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.")
    try:
        await run_in_threadpool(engine.add_adapter, body.lora_name, body.lora_path,
                                check_root=True)
    except AdapterError as exc:
        raise APIError(400, str(exc)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, http: HTTPRequest):
    try:
        http.app.state.engine.remove_adapter(body.lora_name)
    except ModelNotFound as exc:
        raise APIError(404, str(exc), "not_found_error") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
