"""``GET /health`` (status and queue occupancy) and ``GET /metrics`` (Prometheus text); both
open, as in vLLM."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response

router = APIRouter()


@router.get("/health")
async def health(http: HTTPRequest):
    return {"status": "ok", **http.app.state.engine.occupancy()}


@router.get("/metrics")
async def prometheus_metrics(http: HTTPRequest):
    data, content_type = http.app.state.metrics.render()
    return Response(content=data, media_type=content_type)
