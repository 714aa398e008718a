"""OpenAI's files and fine-tuning jobs API, mounted on ``lorakit serve``'s app (same auth, same
error shape), and the function that mounts it.

Routes (shapes follow OpenAI's, so the official ``openai`` client works unchanged):

* ``POST /v1/files`` (multipart ``file`` + ``purpose=fine-tune``), ``GET /v1/files``,
  ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.
  Uploads are checked with ``lorakit data check`` (the served tokenizer and chat template);
  a file with bad records is refused with their ``file:line: field: message`` errors.
* ``POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs``, ``GET .../{id}``,
  ``GET .../{id}/events``, ``GET .../{id}/checkpoints``, ``POST .../{id}/cancel``.

lorakit's own settings ride in the request's ``lorakit`` object (the client sends it with
``extra_body={"lorakit": {...}}``); see :data:`lorakit.jobs.protocol.LORAKIT_KEYS` and
docs/service.md. Everything an owner creates is visible only to that owner (others get 404).
"""

from __future__ import annotations

from contextlib import contextmanager

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse

from lorakit.errors import ConfigError, DataError
from lorakit.jobs.manager import JobManager
from lorakit.jobs.protocol import (JobRequest, checkpoint_object, event_object, file_object,
                                   job_object)
from lorakit.jobs.service import cancel_job, create_job, delete_file, upload_file
from lorakit.jobs.store import NotFound
from lorakit.serve.auth import DEFAULT_OWNER
from lorakit.serve.protocol import APIError


@contextmanager
def _as_api_errors():
    """lorakit errors -> OpenAI-shaped HTTP errors (404 for what this owner cannot see)."""
    try:
        yield
    except NotFound as exc:
        raise APIError(404, str(exc), "not_found_error") from None
    except (ConfigError, DataError) as exc:
        raise APIError(400, str(exc)) from None


def owner_of(request: HTTPRequest) -> str:
    """The caller's owner, as the API-key check found it (``default`` on an open server)."""
    return getattr(request.state, "owner", None) or DEFAULT_OWNER


def _page(items: list[dict], after: str | None, limit: int, *, ends: bool = False) -> dict:
    """OpenAI's list object: the ``limit`` items after the one with id ``after``; ``ends``
    adds ``first_id`` / ``last_id`` (files and checkpoints have them, jobs and events not)."""
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    page = {"object": "list", "data": data, "has_more": len(items) > limit}
    if ends:
        page |= {"first_id": data[0]["id"] if data else None,
                 "last_id": data[-1]["id"] if data else None}
    return page


# ---------------------------------------------------------------------- the router
def jobs_router() -> APIRouter:
    """The files and fine-tuning routes; handlers find the :class:`JobManager` at
    ``request.app.state.jobs``."""
    router = APIRouter(prefix="/v1")

    @router.post("/files")
    async def create_file_route(http: HTTPRequest, file: UploadFile = File(...),
                                purpose: str = Form(...)):
        limits = getattr(http.app.state, "limits", None)
        with _as_api_errors():
            row = await upload_file(http.app.state.jobs, http.app.state.engine.tokenizer,
                                    owner_of(http), file.filename, file.read, purpose,
                                    max_bytes=limits.max_upload_bytes if limits else None)
        return file_object(row)

    @router.get("/files")
    async def list_files(http: HTTPRequest, purpose: str | None = None,
                         limit: int = Query(10000, ge=1, le=10000),
                         after: str | None = None, order: str = "desc"):
        rows = http.app.state.jobs.store.list_files(owner_of(http), purpose)
        if order == "asc":
            rows.reverse()
        return _page([file_object(r) for r in rows], after, limit, ends=True)

    @router.get("/files/{file_id}")
    async def retrieve_file(file_id: str, http: HTTPRequest):
        with _as_api_errors():
            return file_object(http.app.state.jobs.store.get_file(file_id, owner_of(http)))

    @router.get("/files/{file_id}/content")
    async def file_content(file_id: str, http: HTTPRequest):
        with _as_api_errors():
            row = http.app.state.jobs.store.get_file(file_id, owner_of(http))
        return FileResponse(row["path"], filename=row["filename"],
                            media_type="application/octet-stream")

    @router.delete("/files/{file_id}")
    async def delete_file_route(file_id: str, http: HTTPRequest):
        with _as_api_errors():
            delete_file(http.app.state.jobs, owner_of(http), file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/fine_tuning/jobs")
    async def create_job_route(body: JobRequest, http: HTTPRequest):
        with _as_api_errors():
            return job_object(create_job(http.app.state.jobs, owner_of(http), body))

    @router.get("/fine_tuning/jobs")
    async def list_jobs(http: HTTPRequest, after: str | None = None,
                        limit: int = Query(20, ge=1, le=10000)):
        rows = http.app.state.jobs.store.list_jobs(owner_of(http))
        return _page([job_object(r) for r in rows], after, limit)

    @router.get("/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str, http: HTTPRequest):
        with _as_api_errors():
            return job_object(http.app.state.jobs.store.get_job(job_id, owner_of(http)))

    @router.get("/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, http: HTTPRequest, after: str | None = None,
                          limit: int = Query(20, ge=1, le=10000)):
        store = http.app.state.jobs.store
        with _as_api_errors():
            store.get_job(job_id, owner_of(http))
        events = [event_object(e) for e in reversed(store.events(job_id))]  # newest first
        return _page(events, after, limit)

    @router.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, http: HTTPRequest, after: str | None = None,
                               limit: int = Query(10, ge=1, le=10000)):
        store = http.app.state.jobs.store
        with _as_api_errors():
            job = store.get_job(job_id, owner_of(http))
        return _page([checkpoint_object(c, job) for c in store.checkpoints(job_id)], after,
                     limit, ends=True)

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job_route(job_id: str, http: HTTPRequest):
        with _as_api_errors():
            return job_object(cancel_job(http.app.state.jobs, owner_of(http), job_id))

    return router


# ---------------------------------------------------------------------- mounting it
def attach(app, manager: JobManager, *, ui: bool = True) -> None:
    """Add the fine-tuning service to a serving app from :func:`lorakit.serve.api.create_app`:
    the files and jobs routes (behind its API-key check), the web UI at ``/ui`` (which checks
    its key cookie itself), owner-only fine-tuned models; then start the manager.

    Args:
        app: the serving app; its engine is where finished jobs' adapters are registered.
        manager: a :class:`~lorakit.jobs.manager.JobManager` on the same engine.
        ui: also mount the web UI.
    """
    app.include_router(jobs_router(), dependencies=[Depends(app.state.require_api_key)])
    if ui:
        from lorakit.jobs.ui import ui_router

        app.include_router(ui_router())
    app.state.jobs = manager  # fine-tuned models are registered with their job's owner
    manager.start()


def create_service_app(engine, manager: JobManager, *, api_key: str | None = None,
                       api_keys: dict[str, str] | None = None, request_log=None,
                       ui: bool = True):
    """The serving app plus the files / fine-tuning API (and the web UI at ``/ui``).

    Args:
        engine: the serving engine; finished jobs' adapters are registered on it.
        manager: a :class:`~lorakit.jobs.manager.JobManager` (started with the app).
        api_key, api_keys: one key, or a mapping key -> owner (``--keys-file``).
    """
    from lorakit.serve.api import create_app

    app = create_app(engine, api_key=api_key, api_keys=api_keys, request_log=request_log)
    attach(app, manager, ui=ui)
    return app


__all__ = ["jobs_router", "attach", "create_service_app"]
