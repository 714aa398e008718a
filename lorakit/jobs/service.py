"""The operations of the fine-tuning service, called by both the HTTP routes (``api.py``) and
the web UI (``ui/``): upload a dataset, create, cancel, delete.

Each takes the :class:`~lorakit.jobs.manager.JobManager` and the caller's owner, and raises
lorakit errors (:class:`~lorakit.jobs.store.NotFound` for what this owner cannot see,
``ConfigError`` / ``DataError`` for a bad request); the routes turn them into OpenAI-shaped
HTTP errors, the UI into its error pages.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from pathlib import Path

from lorakit.errors import ConfigError, DataError
from lorakit.fileio import fsync_dir
from lorakit.jobs.manager import JobManager
from lorakit.jobs.protocol import JobRequest, check_lorakit_options, resolve_hyperparameters
from lorakit.jobs.store import NotFound, new_id

MAX_UPLOAD_BYTES = 1 << 30  # 1 GiB
_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
_UNFINISHED = ("validating_files", "queued", "running")


async def upload_file(manager: JobManager, tokenizer, owner: str, filename: str, read,
                      purpose: str = "fine-tune", *, max_bytes: int | None = None) -> dict:
    """Store an uploaded dataset and check it (``lorakit data check`` with the served
    tokenizer and chat template); returns the file row.

    ``read(n)`` is an async reader of the upload. The bytes go to a temporary file, are
    fsynced and renamed into place only once the check passed; whatever happens (a bad record,
    hostile JSON, a client that goes away), the temporary file is removed.

    Raises:
        ConfigError, DataError: wrong purpose or type, too large, or bad records (their
            line-numbered errors in the message).
    """
    from starlette.concurrency import run_in_threadpool

    from lorakit.data.check import check_data

    limit = max_bytes or MAX_UPLOAD_BYTES
    if purpose != "fine-tune":
        raise ConfigError(f"purpose must be 'fine-tune' (got {purpose!r}): this server stores "
                          f"files for fine-tuning jobs")
    name = Path(filename or "upload.jsonl").name
    if not name.isprintable() or len(name) > 255:
        raise ConfigError("the file name must be at most 255 printable characters")
    ext = ".json" if name.endswith(".json") else ".jsonl"
    if not name.endswith((".jsonl", ".json")):
        raise ConfigError(f"{name}: upload a .jsonl file (one JSON record per line) or a .json "
                          f"list")
    file_id = new_id("file")
    path = manager.root / "files" / f"{file_id}{ext}"
    tmp = path.with_name(f".{path.name}.tmp")
    size = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := await read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise ConfigError(f"{name} is larger than {limit >> 20} MiB")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        try:
            report = await run_in_threadpool(check_data, str(tmp), tokenizer,
                                             max_length=manager.max_length)
        except DataError as exc:
            raise DataError(str(exc).replace(str(tmp), name)) from None
        except (RecursionError, UnicodeError, ValueError, TypeError, OverflowError) as exc:
            # the data check reports hostile JSON as errors; anything it still raises is the
            # file's fault, never a 500
            raise DataError(f"{name} could not be read as JSON records: "
                            f"{type(exc).__name__}: {str(exc)[:200]}") from None
        errors = report["errors"]
        if errors or not report["examples"]:
            lines = [f"  {name}:{e['line']}: {e['field']}: {_printable(e['message'])}"
                     for e in errors[:20]]
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise DataError(f"{name} has {len(errors)} invalid record(s) of {report['records']}"
                            + (" and no valid example" if not report["examples"] else "")
                            + "; fix them and upload again:\n" + "\n".join(lines) + more)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    kinds = report.get("kinds", {})
    report["files"] = [name]
    row = {"id": file_id, "owner": owner, "filename": name, "purpose": purpose, "bytes": size,
           "created_at": int(time.time()), "status": "processed", "status_details": None,
           "path": str(path), "kind": next(iter(kinds)) if len(kinds) == 1 else "mixed",
           "examples": report["examples"], "report": json.dumps(report, default=str)}
    try:
        manager.store.add_file(row)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    return row


def _printable(text) -> str:
    """A message safe to put in JSON / HTML: lone surrogates escaped."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def create_job(manager: JobManager, owner: str, body: JobRequest) -> dict:
    """Validate a job request and queue it; returns the job row.

    Raises:
        NotFound: a file this owner does not have.
        ConfigError: wrong base model, bad file state, method or hyperparameters.
    """
    store = manager.store
    if body.model != manager.base_name:
        raise ConfigError(f"Model {body.model!r} is not available for fine-tuning: this server "
                          f"fine-tunes its served base {manager.base_name!r}")
    if body.suffix is not None and not _SUFFIX.match(body.suffix):
        raise ConfigError(f"suffix {body.suffix!r} may only hold letters, digits, '.', '_' and "
                          f"'-' (at most 64)")
    if body.metadata and (len(body.metadata) > 16 or any(
            len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise ConfigError("metadata holds at most 16 pairs, keys of at most 64 and values of at "
                          "most 512 characters")
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
                               or not math.isfinite(beta) or not 0 < beta <= 10):
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


def cancel_job(manager: JobManager, owner: str, job_id: str) -> dict:
    """Cancel this owner's job; returns its row (see :meth:`JobManager.cancel`).

    Raises:
        NotFound: no such job for this owner.
        ConfigError: the job already finished.
    """
    return manager.cancel(manager.store.get_job(job_id, owner))


def delete_file(manager: JobManager, owner: str, file_id: str) -> None:
    """Delete this owner's uploaded file (its row and its bytes).

    Raises:
        NotFound: no such file for this owner.
        ConfigError: a job that has not finished uses it.
    """
    store = manager.store
    row = store.get_file(file_id, owner)
    busy = [j["id"] for j in store.list_jobs(status=_UNFINISHED)
            if file_id in (j["training_file"], j["validation_file"])]
    if busy:
        raise ConfigError(f"File {file_id} is used by job {busy[0]}, which has not "
                          f"finished; cancel it or wait before deleting the file")
    store.delete_file(file_id)
    Path(row["path"]).unlink(missing_ok=True)
