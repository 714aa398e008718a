"""The web UI at ``/ui``: upload a dataset (and see its data check), start a job, watch its
status and live loss curve, compare base vs fine-tuned on a prompt, download the adapter or
the evaluation report.

Plain server-rendered HTML (Jinja2 templates in ``templates/``, autoescaped) plus one small
script (``static/ui.js``: polls the job, draws the loss curve as SVG, runs the playground);
no front-end build step. When the server has API keys, the UI asks for one once; the server
keeps it in a server-side session table and the browser only a random session id (an
HttpOnly, SameSite=Strict cookie, ``Secure`` when the page came over https; sessions expire
after :data:`SESSION_TTL_S`). Every page and UI call acts as that key's owner, with the same
isolation as the API.

Cross-site request forgery: every state-changing request (the forms, the playground call)
must come from this server's own pages: its ``Origin`` (or, without one, ``Referer``) must name
this server's host, and it must carry the session's CSRF token (a hidden form field, or the
``X-CSRF-Token`` header for the playground). Anything else is a 403.
"""

from __future__ import annotations

import hmac
import io
import json
import secrets
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, File, Form, UploadFile
from fastapi import Request as HTTPRequest
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lorakit.errors import ConfigError, DataError, LorakitError
from lorakit.jobs.protocol import (JobRequest, checkpoint_object, event_object, file_object,
                                   job_object)
from lorakit.jobs.service import cancel_job, create_job, upload_file
from lorakit.jobs.store import TERMINAL, NotFound
from lorakit.serve.auth import DEFAULT_OWNER

HERE = Path(__file__).parent
COOKIE = "lorakit_session"
SESSION_TTL_S = 12 * 3600
CSRF_HEADER = "x-csrf-token"  # the playground's token; the forms send a csrf_token field


class _Login(Exception):
    """No valid session: show the login page."""


class _Forbidden(Exception):
    """A state-changing request that did not come from this server's pages."""


class Sessions:
    """Server-side sessions: random id -> (owner, CSRF token, expiry). The cookie holds only
    the id; the key itself never leaves the login request."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, max_sessions: int = 10000):
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self._table: dict[str, tuple[str, str, float]] = {}
        self._lock = threading.Lock()

    def create(self, owner: str) -> tuple[str, str]:
        """A new session for ``owner``: (session id, CSRF token)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            if len(self._table) >= self.max_sessions:
                self._table = {k: v for k, v in self._table.items() if v[2] > now}
                while len(self._table) >= self.max_sessions:  # still full: oldest first
                    self._table.pop(next(iter(self._table)))
            self._table[sid] = (owner, csrf, now + self.ttl_s)
        return sid, csrf

    def get(self, sid: str | None) -> tuple[str, str] | None:
        """(owner, CSRF token) of a live session (None: unknown or expired)."""
        if not sid:
            return None
        with self._lock:
            found = self._table.get(sid)
            if found is None:
                return None
            if found[2] <= time.monotonic():
                del self._table[sid]
                return None
            return found[0], found[1]

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._table.pop(sid or "", None)


def _templates():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(["html"]))
    env.filters["tojson_attr"] = lambda v: json.dumps(v)
    return env


class PlaygroundRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=8000)
    models: list[str] = Field(min_length=1, max_length=4)
    max_tokens: int = Field(default=64, ge=1, le=1024)


def _same_origin(http: HTTPRequest) -> bool:
    """Does the request's ``Origin`` (or, without one, ``Referer``) name this server's host?
    A request with neither is refused (browsers send ``Origin`` with every POST)."""
    source = http.headers.get("origin") or http.headers.get("referer")
    host = http.headers.get("host")
    if not source or not host or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


def _secure(http: HTTPRequest) -> bool:
    """Was the page served over TLS? (uvicorn sets the scheme from ``X-Forwarded-Proto`` only
    for the proxies ``lorakit serve --trusted-proxy`` names.)"""
    return http.url.scheme == "https"


def ui_router(sessions: Sessions | None = None) -> APIRouter:
    """Routes under ``/ui`` (public; each checks the session cookie itself)."""
    env = _templates()
    router = APIRouter(prefix="/ui")
    sessions = sessions or Sessions()

    def session(http: HTTPRequest) -> tuple[str, str]:
        """(owner, CSRF token) of the request's session, looked up once per request. A server
        without keys opens an anonymous one (its forms still need the CSRF token)."""
        found = getattr(http.state, "session", None) or sessions.get(http.cookies.get(COOKIE))
        if found is None:
            if http.app.state.keys:
                raise _Login()
            sid, csrf = sessions.create(DEFAULT_OWNER)
            http.state.new_session, found = sid, (DEFAULT_OWNER, csrf)
        http.state.session = found
        return found

    def owner(http: HTTPRequest) -> str:
        return session(http)[0]

    def check_post(http: HTTPRequest, token: str | None) -> str:
        """A state-changing request: same origin and the session's CSRF token; its owner."""
        who, csrf = session(http)
        if not _same_origin(http) or not token or not hmac.compare_digest(
                token.encode(), csrf.encode()):
            raise _Forbidden()
        return who

    def set_session_cookie(response, http: HTTPRequest, sid: str) -> None:
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/ui",
                            secure=_secure(http), max_age=int(sessions.ttl_s))

    def page(name: str, http: HTTPRequest, status: int = 200, **context) -> HTMLResponse:
        csrf = ""
        try:
            csrf = session(http)[1]
        except _Login:
            pass
        html = env.get_template(name).render(base_name=http.app.state.jobs.base_name,
                                             logged_in=bool(http.app.state.keys),
                                             csrf_token=csrf, **context)
        response = HTMLResponse(html, status_code=status)
        new = getattr(http.state, "new_session", None)
        if new:
            set_session_cookie(response, http, new)
        return response

    def guarded(handler):
        """Run a page handler as the session's owner; the login page when there is none."""
        import functools

        @functools.wraps(handler)
        async def wrapper(*args, **kwargs):
            http = kwargs["http"]
            try:
                return await handler(*args, **kwargs)
            except _Login:
                if http.url.path.startswith("/ui/api/"):
                    return JSONResponse({"error": "log in at /ui"}, status_code=401)
                return page("login.html", http, status=401, error=None)
            except _Forbidden:
                message = ("This request did not come from this server's own page (cross-site "
                           "request check failed). Reload the page and try again.")
                if http.url.path.startswith("/ui/api/"):
                    return JSONResponse({"error": message}, status_code=403)
                return page("error.html", http, status=403, error=message)
            except NotFound as exc:
                return page("error.html", http, status=404, error=str(exc))
        return wrapper

    def index_context(http: HTTPRequest, who: str) -> dict:
        store = http.app.state.jobs.store
        files = [file_object(f) | {"kind": f["kind"], "examples": f["examples"]}
                 for f in store.list_files(who)]
        return {"files": files, "jobs": [job_object(j) for j in store.list_jobs(who)]}

    def index_with_error(http: HTTPRequest, who: str, exc: Exception) -> HTMLResponse:
        """The index page again, with why the form was refused (400)."""
        return page("index.html", http, status=400, error=str(exc), **index_context(http, who))

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    @guarded
    async def index(http: HTTPRequest):
        return page("index.html", http, error=None, **index_context(http, owner(http)))

    @router.post("/login")
    async def login(http: HTTPRequest, key: str = Form(..., max_length=4096)):
        if not _same_origin(http):
            return page("error.html", http, status=403, error="This login did not come from "
                        "this server's own page (cross-site request check failed).")
        keys = http.app.state.keys
        who = keys.owner(key) if keys else DEFAULT_OWNER
        if who is None:
            return page("login.html", http, status=401, error="That API key is not valid.")
        sessions.drop(http.cookies.get(COOKIE))  # a fresh id at every login (no fixation)
        sid, _ = sessions.create(who)
        response = RedirectResponse("/ui", status_code=303)
        set_session_cookie(response, http, sid)
        return response

    @router.get("/logout")
    async def logout(http: HTTPRequest):
        sessions.drop(http.cookies.get(COOKIE))
        response = RedirectResponse("/ui", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @router.post("/files")
    @guarded
    async def upload(http: HTTPRequest, file: UploadFile = File(...),
                     csrf_token: str = Form("")):
        who = check_post(http, csrf_token)
        limits = getattr(http.app.state, "limits", None)
        try:
            row = await upload_file(http.app.state.jobs, http.app.state.engine.tokenizer, who,
                                    file.filename, file.read,
                                    max_bytes=limits.max_upload_bytes if limits else None)
        except (ConfigError, DataError) as exc:
            return index_with_error(http, who, exc)
        return RedirectResponse(f"/ui/files/{row['id']}", status_code=303)

    @router.get("/files/{file_id}", response_class=HTMLResponse)
    @guarded
    async def file_page(file_id: str, http: HTTPRequest):
        row = http.app.state.jobs.store.get_file(file_id, owner(http))
        return page("file.html", http, file=file_object(row) | {"kind": row["kind"]},
                    report=json.loads(row["report"] or "{}"))

    @router.post("/jobs")
    @guarded
    async def start_job(http: HTTPRequest, training_file: str = Form(...),
                        validation_file: str = Form(""), method: str = Form("supervised"),
                        n_epochs: str = Form("auto"), learning_rate_multiplier: str = Form("auto"),
                        batch_size: str = Form("auto"), suffix: str = Form(""),
                        lora_r: str = Form(""), beta: str = Form(""), max_steps: str = Form(""),
                        csrf_token: str = Form("")):
        who = check_post(http, csrf_token)

        def number(value: str, kind=int):
            value = value.strip()
            return "auto" if value in ("", "auto") else kind(value)

        try:
            hp = {"n_epochs": number(n_epochs), "batch_size": number(batch_size),
                  "learning_rate_multiplier": number(learning_rate_multiplier, float)}
            extra = {k: int(v) for k, v in (("lora_r", lora_r), ("max_steps", max_steps))
                     if v.strip()}
            method_obj = {"type": method}
            if method == "dpo":
                method_obj["dpo"] = {"hyperparameters": {"beta": number(beta, float)}}
            body = JobRequest(model=http.app.state.jobs.base_name, training_file=training_file,
                              validation_file=validation_file or None, suffix=suffix or None,
                              method=method_obj, hyperparameters=hp, lorakit=extra)
            job = create_job(http.app.state.jobs, who, body)
        except ValueError as exc:  # ConfigError is a ValueError; so are bad numbers
            return index_with_error(http, who, exc)
        return RedirectResponse(f"/ui/jobs/{job['id']}", status_code=303)

    @router.get("/jobs/{job_id}", response_class=HTMLResponse)
    @guarded
    async def job_page(job_id: str, http: HTTPRequest):
        job = http.app.state.jobs.store.get_job(job_id, owner(http))
        return page("job.html", http, job=job_object(job))

    @router.get("/api/jobs/{job_id}")
    @guarded
    async def job_state(job_id: str, http: HTTPRequest):
        store = http.app.state.jobs.store
        job = store.get_job(job_id, owner(http))
        events = store.events(job_id)
        points = [json.loads(e["data"]) for e in events if e["type"] == "metrics"]
        run_dir = Path(job["run_dir"])
        return {"job": job_object(job), "terminal": job["status"] in TERMINAL,
                "loss": [[p["step"], p["train_loss"]] for p in points],
                "valid_loss": [[p["step"], p["valid_loss"]] for p in points if "valid_loss" in p],
                "events": [event_object(e) for e in reversed(events[-40:])],
                "checkpoints": [checkpoint_object(c, job) for c in store.checkpoints(job_id)],
                "adapter": (run_dir / "adapter").is_dir() and job["status"] == "succeeded",
                "report": (run_dir / "eval" / "report.html").is_file()}

    @router.post("/jobs/{job_id}/cancel")
    @guarded
    async def cancel(job_id: str, http: HTTPRequest, csrf_token: str = Form("")):
        who = check_post(http, csrf_token)
        try:
            cancel_job(http.app.state.jobs, who, job_id)
        except ConfigError:
            pass  # already finished: the page shows it
        return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)

    @router.get("/jobs/{job_id}/adapter.zip")
    @guarded
    async def adapter_zip(job_id: str, http: HTTPRequest):
        job = http.app.state.jobs.store.get_job(job_id, owner(http))
        folder = Path(job["run_dir"]) / "adapter"
        if job["status"] != "succeeded" or not folder.is_dir():
            raise NotFound(f"job {job_id} has no finished adapter")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.iterdir()):
                zf.write(file, f"adapter/{file.name}")
        name = (job["fine_tuned_model"] or job_id).replace(":", "_")
        return Response(buffer.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    @router.get("/jobs/{job_id}/eval/{name}")
    @guarded
    async def eval_file(job_id: str, name: str, http: HTTPRequest):
        job = http.app.state.jobs.store.get_job(job_id, owner(http))
        folder = (Path(job["run_dir"]) / "eval").resolve()
        file = (folder / name).resolve()
        if file.parent != folder or not file.is_file():
            raise NotFound(f"job {job_id} has no evaluation file {name!r}")
        return FileResponse(file)

    @router.get("/jobs/{job_id}/loss.png")
    @guarded
    async def loss_png(job_id: str, http: HTTPRequest):
        job = http.app.state.jobs.store.get_job(job_id, owner(http))
        file = Path(job["run_dir"]) / "loss.png"
        if not file.is_file():
            raise NotFound(f"job {job_id} has no loss plot yet")
        return FileResponse(file, media_type="image/png")

    @router.post("/api/playground")
    @guarded
    async def playground(body: PlaygroundRequest, http: HTTPRequest):
        """The same prompt through each model (greedy), for a side-by-side comparison."""
        from lorakit.data.tokenize import prompt_ids
        from lorakit.serve.engine import SamplingParams

        who = check_post(http, http.headers.get(CSRF_HEADER))
        engine, visible = http.app.state.engine, http.app.state.model_visible
        ids = await run_in_threadpool(prompt_ids, engine.tokenizer, body.prompt)
        outputs = {}
        for model in body.models:
            try:
                if not visible(who, model):
                    raise NotFound(f"The model `{model}` does not exist.")
                adapter = engine.resolve_model(model)
                params = SamplingParams(max_tokens=body.max_tokens, temperature=0.0)
                result = await run_in_threadpool(engine.generate, ids, adapter, params)
                outputs[model] = {"text": result["text"],
                                  "completion_tokens": result["completion_tokens"]}
            except LorakitError as exc:
                outputs[model] = {"error": str(exc)}
        return {"outputs": outputs}

    @router.get("/static/{name}")
    async def static(name: str):
        file = HERE / "static" / name
        if name not in ("ui.js", "ui.css") or not file.is_file():
            return Response(status_code=404)
        return FileResponse(file, media_type="text/javascript" if name.endswith(".js")
                            else "text/css")

    return router
