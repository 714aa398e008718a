"""The web UI at ``/ui``: upload a dataset (and see its data check), start a job, watch its
status and live loss curve, compare base vs fine-tuned on a prompt, download the adapter or
the evaluation report.

Plain server-rendered HTML (Jinja2 templates in ``templates/``, autoescaped) plus one small
script (``static/ui.js``: polls the job, draws the loss curve as SVG, runs the playground);
no front-end build step. When the server has API keys, the UI asks for one once and keeps it
in an HttpOnly, SameSite=Strict cookie; every page and UI call acts as that key's owner, with
the same isolation as the API.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

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
COOKIE = "lorakit_key"


class _Login(Exception):
    """No valid key cookie: show the login page."""


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


def ui_router() -> APIRouter:
    """Routes under ``/ui`` (public; each checks the key cookie itself)."""
    env = _templates()
    router = APIRouter(prefix="/ui")

    def owner(http: HTTPRequest) -> str:
        """The owner of the key in the cookie (the server's keys, ``app.state.keys``)."""
        keys = http.app.state.keys
        if not keys:
            return DEFAULT_OWNER
        found = keys.owner(http.cookies.get(COOKIE, ""))
        if found is None:
            raise _Login()
        return found

    def page(name: str, http: HTTPRequest, status: int = 200, **context) -> HTMLResponse:
        html = env.get_template(name).render(base_name=http.app.state.jobs.base_name,
                                             logged_in=bool(http.app.state.keys), **context)
        return HTMLResponse(html, status_code=status)

    def guarded(handler):
        """Run a page handler as the cookie's owner; the login page when there is none."""
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
    async def login(http: HTTPRequest, key: str = Form(...)):
        if http.app.state.keys.owner(key) is None:
            return page("login.html", http, status=401, error="That API key is not valid.")
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/ui")
        return response

    @router.get("/logout")
    async def logout():
        response = RedirectResponse("/ui", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @router.post("/files")
    @guarded
    async def upload(http: HTTPRequest, file: UploadFile = File(...)):
        who = owner(http)
        try:
            row = await upload_file(http.app.state.jobs, http.app.state.engine.tokenizer, who,
                                    file.filename, file.read)
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
                        lora_r: str = Form(""), beta: str = Form(""), max_steps: str = Form("")):
        who = owner(http)

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
    async def cancel(job_id: str, http: HTTPRequest):
        try:
            cancel_job(http.app.state.jobs, owner(http), job_id)
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

        who = owner(http)
        engine, visible = http.app.state.engine, http.app.state.model_visible
        ids = prompt_ids(engine.tokenizer, body.prompt)  # one user turn through the template
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
