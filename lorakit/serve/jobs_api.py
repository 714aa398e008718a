"""OpenAI's files and fine-tuning jobs API on ``lorakit serve`` (same auth, same error shape).

Routes (shapes follow OpenAI's, so the official ``openai`` client works unchanged):

* ``POST /v1/files`` (multipart ``file`` + ``purpose=fine-tune``), ``GET /v1/files``,
  ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.
  Uploads are checked with ``lorakit data check`` (the served tokenizer and chat template);
  a file with bad records is refused with their ``file:line: field: message`` errors.
* ``POST /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs``, ``GET .../{id}``,
  ``GET .../{id}/events``, ``GET .../{id}/checkpoints``, ``POST .../{id}/cancel``.

lorakit's own settings ride in the request's ``lorakit`` object (the client sends it with
``extra_body={"lorakit": {...}}``); see :data:`lorakit.serve.jobs.LORAKIT_KEYS` and
docs/service.md. Everything an owner creates is visible only to that owner (others get 404).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, File, Form, UploadFile
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from lorakit.errors import ConfigError, DataError
from lorakit.serve.api import APIError
from lorakit.serve.jobs import (NotFound, check_lorakit_options, checkpoint_object, event_object,
                                file_object, job_object, new_id, resolve_hyperparameters)

MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,64}$")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # integrations, ... are accepted and ignored

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    method: dict | None = None
    hyperparameters: dict | None = None
    metadata: dict[str, str] | None = None
    lorakit: dict | None = None


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
    from lorakit.serve.jobs import DEFAULT_OWNER

    return getattr(request.state, "owner", None) or DEFAULT_OWNER


def _page(items: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


# ---------------------------------------------------------------------- shared with the UI
async def upload_file(app, owner: str, filename: str, read, purpose: str = "fine-tune") -> dict:
    """Store an uploaded dataset and check it; returns the file row.

    ``read(n)`` is an async reader of the upload. Raises ConfigError / DataError (400): wrong
    purpose or type, too large, or bad records (their line-numbered errors in the message).
    """
    from lorakit.data.check import check_data

    manager = app.state.jobs
    if purpose != "fine-tune":
        raise ConfigError(f"purpose must be 'fine-tune' (got {purpose!r}): this server stores "
                          f"files for fine-tuning jobs")
    name = Path(filename or "upload.jsonl").name
    ext = ".json" if name.endswith(".json") else ".jsonl"
    if not name.endswith((".jsonl", ".json")):
        raise ConfigError(f"{name}: upload a .jsonl file (one JSON record per line) or a .json "
                          f"list")
    file_id = new_id("file")
    path = manager.root / "files" / f"{file_id}{ext}"
    tmp = path.with_name(f".{path.name}.tmp")
    size = 0
    with open(tmp, "wb") as out:
        while chunk := await read(1 << 20):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                out.close()
                tmp.unlink()
                raise ConfigError(f"{name} is larger than {MAX_UPLOAD_BYTES >> 20} MiB")
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    try:
        report = await run_in_threadpool(check_data, str(tmp), app.state.engine.tokenizer,
                                         max_length=manager.max_length)
    except DataError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(str(exc).replace(str(tmp), name)) from None
    errors = report["errors"]
    if errors or not report["examples"]:
        tmp.unlink(missing_ok=True)
        lines = [f"  {name}:{e['line']}: {e['field']}: {e['message']}" for e in errors[:20]]
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DataError(f"{name} has {len(errors)} invalid record(s) of {report['records']}"
                        + (" and no valid example" if not report["examples"] else "")
                        + "; fix them and upload again:\n" + "\n".join(lines) + more)
    os.replace(tmp, path)
    kinds = report.get("kinds", {})
    report["files"] = [name]
    row = {"id": file_id, "owner": owner, "filename": name, "purpose": purpose, "bytes": size,
           "created_at": int(time.time()), "status": "processed", "status_details": None,
           "path": str(path), "kind": next(iter(kinds)) if len(kinds) == 1 else "mixed",
           "examples": report["examples"], "report": json.dumps(report, default=str)}
    manager.store.add_file(row)
    return row


def create_job(app, owner: str, body: JobRequest) -> dict:
    """Validate a job request and queue it; returns the job row.

    Raises:
        NotFound: a file this owner does not have.
        ConfigError: wrong base model, bad file state, method or hyperparameters.
    """
    manager, store = app.state.jobs, app.state.jobs.store
    if body.model != manager.base_name:
        raise ConfigError(f"Model {body.model!r} is not available for fine-tuning: this server "
                          f"fine-tunes its served base {manager.base_name!r}")
    if body.suffix is not None and not _SUFFIX.match(body.suffix):
        raise ConfigError(f"suffix {body.suffix!r} may only hold letters, digits, '.', '_' and "
                          f"'-' (at most 64)")
    method = dict(body.method or {"type": "supervised"})
    kind = method.get("type", "supervised")
    if kind not in ("supervised", "dpo"):
        raise ConfigError(f"method.type {kind!r} is not supported; use 'supervised' or 'dpo'")
    if kind == "dpo":
        import importlib.util

        if importlib.util.find_spec("lorakit.train.dpo") is None:
            raise ConfigError("method.type 'dpo' needs lorakit's DPO recipe "
                              "(lorakit.train.dpo), which this install does not have")
    files = {}
    for field in ("training_file", "validation_file"):
        file_id = getattr(body, field)
        if file_id is None:
            continue
        try:
            row = store.get_file(file_id, owner)
        except NotFound:
            raise NotFound(f"{field} {file_id!r}: no such file (upload it with POST /v1/files)") \
                from None
        if row["status"] != "processed" or row["purpose"] != "fine-tune":
            raise ConfigError(f"{field} {file_id} is not a processed fine-tune file")
        wanted = "preference" if kind == "dpo" else None
        if (wanted and row["kind"] != wanted) or (not wanted and row["kind"] in ("preference",
                                                                                  "mixed")):
            raise ConfigError(
                f"{field} {file_id} holds {row['kind']} examples; method {kind!r} needs "
                + ("preference pairs (prompt, chosen, rejected)" if wanted else
                   "chat or prompt/completion examples (preference pairs train with method dpo)"))
        files[field] = row
    section = method.get(kind) or {}
    requested = {**(body.hyperparameters or {}), **(section.get("hyperparameters") or {})}
    hp = resolve_hyperparameters(requested, files["training_file"]["examples"])
    options = check_lorakit_options(body.lorakit)
    method_hp = dict(hp)
    if kind == "dpo":
        beta = requested.get("beta", "auto")
        if beta != "auto" and (not isinstance(beta, (int, float)) or isinstance(beta, bool)
                               or not 0 < beta <= 10):
            raise ConfigError(f"method.dpo.hyperparameters.beta must be 'auto' or in (0, 10], "
                              f"got {beta!r}")
        method_hp["beta"] = beta if beta != "auto" else options.get("beta", 0.1)
    job_id = new_id("ftjob")
    row = {"id": job_id, "owner": owner, "model": body.model, "base_model": manager.base_model,
           "training_file": body.training_file, "validation_file": body.validation_file,
           "suffix": body.suffix, "seed": body.seed if body.seed is not None
           else secrets.randbelow(2**31), "method": json.dumps({"type": kind, kind: {
               "hyperparameters": method_hp}}),
           "hyperparameters": json.dumps(hp), "lorakit": json.dumps(options),
           "metadata": json.dumps(body.metadata) if body.metadata else None,
           "status": "validating_files", "created_at": int(time.time()),
           "run_dir": str(manager.root / "jobs" / job_id)}
    store.add_job(row)
    store.add_event(job_id, f"Validating training file: {body.training_file}"
                    + (f" and validation file: {body.validation_file}"
                       if body.validation_file else ""))
    store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    manager.wake()
    return store.get_job(job_id)


# ---------------------------------------------------------------------- the router
def jobs_router() -> APIRouter:
    """The files and fine-tuning routes; handlers find the :class:`JobManager` at
    ``request.app.state.jobs``."""
    router = APIRouter(prefix="/v1")

    @router.post("/files")
    async def create_file_route(http: HTTPRequest, file: UploadFile = File(...),
                                purpose: str = Form(...)):
        with _as_api_errors():
            row = await upload_file(http.app, owner_of(http), file.filename, file.read, purpose)
        return file_object(row)

    @router.get("/files")
    async def list_files(http: HTTPRequest, purpose: str | None = None, limit: int = 10000,
                         after: str | None = None, order: str = "desc"):
        rows = http.app.state.jobs.store.list_files(owner_of(http), purpose)
        if order == "asc":
            rows.reverse()
        data, more = _page([file_object(r) for r in rows], after, limit)
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

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
    async def delete_file(file_id: str, http: HTTPRequest):
        store = http.app.state.jobs.store
        with _as_api_errors():
            row = store.get_file(file_id, owner_of(http))
        busy = [j["id"] for j in store.list_jobs(status=("validating_files", "queued", "running"))
                if file_id in (j["training_file"], j["validation_file"])]
        if busy:
            raise APIError(400, f"File {file_id} is used by job {busy[0]}, which has not "
                                f"finished; cancel it or wait before deleting the file")
        store.delete_file(file_id)
        Path(row["path"]).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.post("/fine_tuning/jobs")
    async def create_job_route(body: JobRequest, http: HTTPRequest):
        with _as_api_errors():
            return job_object(create_job(http.app, owner_of(http), body))

    @router.get("/fine_tuning/jobs")
    async def list_jobs(http: HTTPRequest, after: str | None = None, limit: int = 20):
        rows = http.app.state.jobs.store.list_jobs(owner_of(http))
        data, more = _page([job_object(r) for r in rows], after, limit)
        return {"object": "list", "data": data, "has_more": more}

    @router.get("/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str, http: HTTPRequest):
        with _as_api_errors():
            return job_object(http.app.state.jobs.store.get_job(job_id, owner_of(http)))

    @router.get("/fine_tuning/jobs/{job_id}/events")
    async def list_events(job_id: str, http: HTTPRequest, after: str | None = None,
                          limit: int = 20):
        store = http.app.state.jobs.store
        with _as_api_errors():
            store.get_job(job_id, owner_of(http))
        events = [event_object(e) for e in reversed(store.events(job_id))]  # newest first
        data, more = _page(events, after, limit)
        return {"object": "list", "data": data, "has_more": more}

    @router.get("/fine_tuning/jobs/{job_id}/checkpoints")
    async def list_checkpoints(job_id: str, http: HTTPRequest, after: str | None = None,
                               limit: int = 10):
        store = http.app.state.jobs.store
        with _as_api_errors():
            job = store.get_job(job_id, owner_of(http))
        rows = [checkpoint_object(c, job) for c in store.checkpoints(job_id)]
        data, more = _page(rows, after, limit)
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @router.post("/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, http: HTTPRequest):
        manager = http.app.state.jobs
        with _as_api_errors():
            return job_object(manager.cancel(manager.store.get_job(job_id, owner_of(http))))

    return router


def create_service_app(engine, manager, *, api_key: str | None = None,
                       api_keys: dict[str, str] | None = None, request_log=None,
                       ui: bool = True):
    """The serving app plus the files / fine-tuning API (and the web UI at ``/ui``).

    Args:
        engine: the serving engine; finished jobs' adapters are registered on it.
        manager: a :class:`lorakit.serve.jobs.JobManager` (started with the app).
        api_key, api_keys: one key, or a mapping key -> owner (``--keys-file``).
    """
    from lorakit.serve.api import create_app

    public = []
    if ui:
        from lorakit.serve.ui import ui_router

        public.append(ui_router())
    app = create_app(engine, api_key=api_key, api_keys=api_keys, request_log=request_log,
                     extra_routers=[jobs_router()], public_routers=public)
    app.state.jobs = manager
    app.state.model_visible = manager.visible
    keys = dict(api_keys or {})
    if api_key:
        keys[api_key] = "default"
    app.state.ui_keys = keys
    manager.start()
    return app


__all__ = ["jobs_router", "create_service_app", "upload_file", "create_job", "JobRequest"]
