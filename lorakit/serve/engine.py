r"""The serving engine: one base model, many LoRA adapters, continuous batching with a KV cache.

One background thread owns the model. Each loop turn it

1. applies adapter installs / removals that are ready (between forwards, so nothing races),
2. admits waiting requests whose adapter is resident: the ones admitted in the same turn are
   prefilled together, one left-padded forward under their adapters (positions counted from
   each row's first token, so a row computes what it computes alone, to float rounding), at
   most ``max_prefill_tokens`` padded tokens per forward; their KV caches join the batch,
3. runs one decode step for every running request together, under
   ``lorakit.mixed_batch(model, [adapter per row])``: N requests for N adapters cost one
   batched forward per token, not N,
4. samples one token per row, streams text out, and drops finished or cancelled rows.

The batch KV cache is left-padded::

    row 0:  [pad pad  p0 p1 p2 | t0 t1]      attention mask 0 0 1 1 1 1 1
    row 1:  [ q0  q1  q2 q3 q4 | u0 u1]      attention mask 1 1 1 1 1 1 1

Positions come from the mask (``position_ids = real tokens so far``), so padding never
shifts RoPE, and columns that are padding for every row are trimmed when rows leave.

We write this loop instead of using ``model.generate`` because generate runs one fixed batch
to the end: requests could not join between steps or leave early, and it knows nothing of
per-row adapters. Model code, caches and chat templates stay transformers'.

Adapters are kept in an LRU of at most ``max_loaded_adapters``; an evicted adapter stays
registered and is read from disk again (on a worker thread) when a request asks for it.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.models.modules import kv_cache_argument, left_padded
from lorakit.serve import adapters as adapter_files


class ModelNotFound(LorakitError):
    """A request names a model (base or adapter) the server does not serve."""


class PromptTooLong(LorakitError):
    """Prompt (plus requested tokens) longer than ``max_model_len``."""


class EngineStopped(LorakitError):
    """The engine is stopping or stopped: no new request is accepted."""


class LoadTimeout(AdapterError):
    """An adapter load did not finish in time (it goes on in the background)."""


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range is [-2**63, 2**64 - 1]
MIN_SEED = -(2**63)


@dataclass
class SamplingParams:
    """How to generate. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            raise ConfigError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s or len(s) > 256 for s in self.stop):
            raise ConfigError("stop takes at most 4 non-empty strings of at most 256 characters")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not MIN_SEED <= self.seed <= MAX_SEED):
            raise ConfigError(f"seed must be an integer in [{MIN_SEED}, {MAX_SEED}], got "
                              f"{self.seed!r}")


_ids = itertools.count()


@dataclass
class Request:
    """One generation request; events go to ``sink`` from the engine thread.

    Events: ``("delta", text)`` for new text, then ``("done", finish_reason)`` or
    ``("error", message, status)`` (``status``: the HTTP status the error deserves: 400 for a
    request whose sampling parameters failed, 504 past its deadline, 500 otherwise).
    ``finish_reason`` is "stop" (EOS or a stop string), "length" or "cancelled".

    ``adapter`` is the name the client asked for; the engine binds the request to that
    adapter's current version when it is submitted (``slot``), so an unload or a re-load of the
    same name never changes the adapter a request already accepted runs with.
    ``deadline`` (``time.monotonic()`` seconds, None: none): the request ends with an error
    when it has not finished by then.
    """

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Callable[[tuple], None]
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of text already sent
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    deadline: float | None = None
    slot: str | None = None  # the installed adapter version (engine-internal name)
    ended: bool = False  # a final event ("done" or "error") was sent

    def cancel(self) -> None:
        """Stop generating for this request (e.g. its client disconnected)."""
        self.cancelled = True

    def end(self, event: tuple) -> None:
        """Send the final event once (later calls are ignored)."""
        if not self.ended:
            self.ended = True
            self.sink(event)


class _SyncSink:
    """Collects a request's events for blocking callers (tests, benchmarks, the CLI)."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event: tuple) -> None:
        self.events.put(event)


@dataclass
class AdapterEntry:
    """One registered version of an adapter.

    ``state``: ``loading`` (registered, not installed yet: requests wait), ``ready``
    (installable; resident or evicted), ``retired`` (unloaded or replaced: requests accepted
    before keep using it, new ones cannot), ``failed`` (could not be installed, or failed in
    a forward: gone for everyone). ``owner`` None: everyone may use it (the base's
    ``--adapter`` ones, and every adapter of a server without a keys file).
    """

    name: str
    path: Path
    slot: str
    owner: str | None = None
    source: str = "runtime"  # "static" (--adapter), "runtime" (load route), "fine-tuned"
    state: str = "loading"


class Engine:
    """Serve one base model and many adapters with mixed-adapter continuous batching.

    Args:
        model, tokenizer: from :func:`lorakit.load_model` (no adapters on it yet).
        base_name: the model id clients use for the base (``model`` field).
        adapter_root: folder that runtime-loaded adapter paths must stay inside.
        max_loaded_adapters: adapters resident in memory at once (LRU beyond that).
        max_batch_size: rows decoded together.
        max_model_len: longest prompt + completion, in tokens (default: the model's
            ``max_position_embeddings``).
        max_prefill_tokens: requests admitted together are prefilled in one forward while
            rows x longest prompt stays within this (1: each prompt alone).
    """

    def __init__(self, model, tokenizer, *, base_name: str = "base",
                 adapter_root: str | Path | None = None, max_loaded_adapters: int = 8,
                 max_batch_size: int = 16, max_model_len: int | None = None,
                 max_prefill_tokens: int = 4096):
        if max_loaded_adapters < 1 or max_batch_size < 1 or max_prefill_tokens < 1:
            raise ConfigError("max_loaded_adapters, max_batch_size and max_prefill_tokens must "
                              "be >= 1")
        if getattr(model, "lorakit_adapters", None):
            raise ConfigError("pass the engine a base model without adapters; register adapters "
                              "with Engine.add_adapter(name, path)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.max_loaded_adapters = max_loaded_adapters
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        config_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = int(max_model_len or config_len)
        self.device = next(model.parameters()).device
        emb = model.get_input_embeddings().weight
        self.adapter_dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
        self.signature = adapter_files.base_signature(model)
        self.eos_ids = _stop_token_ids(tokenizer, model)
        self._cache_arg = kv_cache_argument(model)
        self.created = int(time.time())

        # guards the registry, the slots, the waiting queue and counters
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._registry: dict[str, AdapterEntry] = {}  # name -> current version (new requests)
        self._slots: dict[str, AdapterEntry] = {}  # slot -> every version still alive
        self._slot_ids = itertools.count()
        self._resident: OrderedDict[str, None] = OrderedDict()  # slots in the model, LRU order
        self._loading: dict[str, Future] = {}  # slot -> install in progress
        self._ready: queue.Queue = queue.Queue()  # (slot, prepared|exception, Future)
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []
        self._cache = None  # DynamicCache of the running rows
        self._mask: torch.Tensor | None = None  # (rows, L) 1 = real token
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorakit-adapter-read")
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"steps": 0, "step_rows": 0, "adapter_loads": 0, "adapter_evictions": 0,
                      "row_errors": 0, "adapter_faults": 0, "prefills": 0, "prefill_rows": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; every request still waiting or running, and every adapter load
        still pending, ends with an error (nothing is left waiting for ever)."""
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._pool.shutdown(wait=False)
        message = "the server is shutting down"
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            loading, self._loading = list(self._loading.values()), {}
        for req in waiting + self._rows:
            req.end(("error", message, 503))
        self._rows, self._cache, self._mask = [], None, None
        for future in loading:
            if not future.done():
                future.set_exception(AdapterError(message))
        while True:
            try:
                _, _, future = self._ready.get_nowait()
            except queue.Empty:
                break
            if not future.done():
                future.set_exception(AdapterError(message))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> dict[str, Path]:
        """Registered adapters (name -> folder), resident or not."""
        with self._lock:
            return {name: e.path for name, e in self._registry.items()}

    def adapter(self, name: str) -> AdapterEntry | None:
        """The registered entry of ``name`` (a copy; None: not registered)."""
        with self._lock:
            entry = self._registry.get(name)
            return None if entry is None else AdapterEntry(**vars(entry))

    def resident_adapters(self) -> list[str]:
        """Adapters currently in the model, least recently used first (their names)."""
        with self._lock:
            return [self._slots[s].name for s in self._resident if s in self._slots]

    def add_adapter(self, name: str, path: str | Path, *, check_root: bool = False,
                    wait: bool = True, timeout: float = 120, owner: str | None = None,
                    source: str = "runtime") -> Path:
        """Register adapter ``name`` from ``path`` and load it (hot: generation goes on).

        The folder is read and checked on the calling thread; the engine installs it between
        decode steps. An install that fails leaves nothing behind: the name is unregistered,
        requests waiting for it get the error, and other adapters are untouched.

        Args:
            check_root: require ``path`` to stay inside ``adapter_root`` (runtime loads).
            wait: block until the adapter is resident (the LRU may evict others for it).
            timeout: longest wait; then AdapterError (the load goes on in the background).
            owner: who may use and unload it (None: everyone; see docs/serve.md).
            source: ``static``, ``runtime`` or ``fine-tuned`` (what /v1/models reports).

        Raises:
            AdapterError: name taken or reserved, unsafe path, the adapter does not fit the
                base or could not be installed (the message says why), or ``timeout``.
        """
        if not isinstance(name, str) or not name or name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is empty or the base model's name")
        if wait and self._thread is None:
            raise AdapterError("the engine is not running: start() it first, or register with "
                               "wait=False (installed once it starts)")
        if len(name) > 256 or not name.isprintable():
            raise AdapterError("adapter names are at most 256 printable characters")
        folder = adapter_files.resolve_under_root(self.adapter_root, path) if check_root \
            else Path(path).resolve()
        prepared = adapter_files.prepare(folder, self.signature)  # raises before registering
        with self._lock:
            if self._stop:
                raise AdapterError("the engine is stopped")
            if name in self._registry:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
            slot = f"lk{next(self._slot_ids)}"
            entry = AdapterEntry(name, folder, slot, owner, source)
            self._registry[name] = entry
            self._slots[slot] = entry
            future: Future = Future()
            self._loading[slot] = future
        self._ready.put((slot, prepared, future))
        self._wakeup.set()
        if wait:
            try:
                future.result(timeout=timeout)
            except FutureTimeout:
                raise LoadTimeout(f"adapter {name!r} is not loaded after {timeout:g} s (every "
                                   f"adapter slot is busy); it loads as soon as one is free") \
                    from None
        return folder

    def remove_adapter(self, name: str, slot: str | None = None) -> None:
        """Unregister adapter ``name`` at once: new requests for it are refused (or go to a
        version loaded again under the same name); requests already accepted finish with it,
        then it leaves the model.

        Args:
            slot: remove only this version (what the caller checked its rights on).

        Raises:
            ModelNotFound: no such adapter (or no longer that version).
        """
        with self._lock:
            entry = self._registry.get(name)
            if entry is None or (slot is not None and entry.slot != slot):
                raise ModelNotFound(f"The lora adapter '{name}' cannot be found.")
            del self._registry[name]
            entry.state = "retired"
        self._wakeup.set()

    def _request_load(self, slot: str) -> None:
        """Start reading an evicted adapter again on the worker pool (engine thread, lock held)."""
        entry = self._slots.get(slot)
        if entry is None or slot in self._loading:
            return
        future: Future = Future()
        self._loading[slot] = future

        def read():
            try:
                self._ready.put((slot, adapter_files.prepare(entry.path, self.signature), future))
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting requests
                self._ready.put((slot, exc, future))
            self._wakeup.set()

        try:
            self._pool.submit(read)
        except RuntimeError as exc:  # the pool is shut down: the engine is stopping
            self._ready.put((slot, AdapterError(str(exc)), future))

    def _in_use(self) -> set:
        with self._lock:
            return {r.slot for r in self._rows} | {r.slot for r in self._waiting}

    def _apply_adapter_changes(self) -> None:
        """Installs and removals, between forwards (engine thread only)."""
        in_use = self._in_use()
        with self._lock:
            dead = [s for s, e in self._slots.items()
                    if e.state in ("retired", "failed") and s not in in_use
                    and s not in self._loading]
        for slot in dead:  # unloaded / replaced versions nobody uses any more
            self._drop_slot(slot)
        deferred = []
        while True:
            try:
                slot, prepared, future = self._ready.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                entry = self._slots.get(slot)
            if isinstance(prepared, Exception):
                # a first load that fails unregisters the name; a failed re-read of an evicted
                # adapter fails the requests waiting for it and keeps it registered
                self._fail_adapter(slot, f"adapter {entry.name if entry else slot!r} could not "
                                         f"be loaded: {prepared}", future, prepared,
                                   unregister=entry is None or entry.state == "loading")
                continue
            if entry is None or (entry.state in ("retired", "failed") and slot not in in_use):
                with self._lock:
                    self._loading.pop(slot, None)
                future.set_exception(AdapterError(
                    f"adapter {entry.name if entry else slot!r} was unloaded before it was "
                    f"ready"))
                if entry is not None:
                    self._drop_slot(slot)
                continue
            if slot in self._resident:  # already there (a duplicate read)
                with self._lock:
                    self._loading.pop(slot, None)
                future.set_result(None)
                continue
            if len(self._resident) >= self.max_loaded_adapters and not self._evict(in_use):
                deferred.append((slot, prepared, future))  # every slot busy: try next step
                continue
            try:
                adapter_files.install(self.model, slot, prepared, self.adapter_dtype)
            except Exception as exc:  # noqa: BLE001 - this adapter only; install() cleaned up
                message = f"adapter {entry.name!r} could not be installed: " \
                          f"{type(exc).__name__}: {exc}"
                # a first install that fails unregisters the name; a failed re-install of an
                # evicted adapter fails the requests waiting for it (it may work next time)
                self._fail_adapter(slot, message, future, AdapterError(message),
                                   unregister=entry.state == "loading")
                continue
            with self._lock:
                self._resident[slot] = None
                self._loading.pop(slot, None)
                if entry.state == "loading":
                    entry.state = "ready"
            self.stats["adapter_loads"] += 1
            future.set_result(None)
        for item in deferred:
            self._ready.put(item)

    def _drop_slot(self, slot: str) -> None:
        """Take an adapter version out of the model and forget it (engine thread)."""
        if slot in self._resident:
            self._drop_slot_keep(slot)
        with self._lock:
            self._slots.pop(slot, None)

    def _fail_adapter(self, slot: str, message: str, future: Future | None = None,
                      exc: Exception | None = None, unregister: bool = True) -> None:
        """An adapter version that cannot serve: unregister it (if it is still the current
        version of its name), fail the requests waiting for it, drop it from the model."""
        with self._lock:
            entry = self._slots.get(slot)
            self._loading.pop(slot, None)
            if entry is not None and unregister:
                if self._registry.get(entry.name) is entry:
                    del self._registry[entry.name]
                entry.state = "failed"
            failed = [r for r in self._waiting if r.slot == slot]
            for r in failed:
                self._waiting.remove(r)
        for r in failed:
            r.end(("error", message, 500))
        if future is not None and not future.done():
            future.set_exception(exc or AdapterError(message))
        if unregister and not any(r.slot == slot for r in self._rows):
            self._drop_slot(slot)

    def _evict(self, in_use: set) -> bool:
        for slot in self._resident:  # least recently used first
            if slot not in in_use:
                self._drop_slot_keep(slot)
                self.stats["adapter_evictions"] += 1
                return True
        return False

    def _drop_slot_keep(self, slot: str) -> None:
        """Evict: out of the model, still registered (read again when asked for)."""
        try:
            adapter_files.purge(self.model, slot)
        except Exception:  # noqa: BLE001 - a removal that broke half way: clear the layers left
            adapter_files.purge(self.model, slot)
        with self._lock:
            self._resident.pop(slot, None)

    # ------------------------------------------------------------------ requests
    def resolve_model(self, model: str, visible: Callable[[AdapterEntry], bool] | None = None
                      ) -> str | None:
        """The adapter a ``model`` field names (None: the base).

        Args:
            visible: which adapters the caller may see (default: all); others are reported
                as not existing, and the message lists only visible ones.

        Raises:
            ModelNotFound: neither the base nor a registered adapter the caller may see.
        """
        if model == self.base_name:
            return None
        with self._lock:
            entry = self._registry.get(model)
            if entry is not None and (visible is None or visible(entry)):
                return model
            known = [self.base_name, *(n for n, e in self._registry.items()
                                       if visible is None or visible(e))]
        shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20
                                         else "")
        raise ModelNotFound(f"The model `{model}` does not exist. Served models: {shown}")

    def check_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises PromptTooLong when prompt + max_tokens exceeds ``max_model_len``."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise PromptTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({len(prompt_ids)} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                f"messages or completion.")

    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the running batch at the next decode step. The request
        is bound to the current version of its adapter here (atomic with unload / load)."""
        request.params.validate()
        self.check_length(request.prompt_ids, request.params)
        if request.params.temperature > 0:
            request.generator = torch.Generator()
            if request.params.seed is not None:
                request.generator.manual_seed(int(request.params.seed))
            else:
                request.generator.seed()
        with self._lock:
            if self._stop:
                raise EngineStopped("the server is shutting down")
            if request.adapter is not None:
                entry = self._registry.get(request.adapter)
                if entry is None:
                    raise ModelNotFound(f"The model `{request.adapter}` does not exist.")
                request.slot = entry.slot
            self._waiting.append(request)
        self._wakeup.set()
        return request

    def generate(self, prompt_ids: list[int], adapter: str | None = None,
                 params: SamplingParams | None = None, timeout: float = 600) -> dict:
        """Blocking generation of one request (same path as the server's).

        Returns:
            ``{"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"}``.
        """
        sink = _SyncSink()
        req = Request(list(prompt_ids), adapter, params or SamplingParams(), sink,
                      deadline=time.monotonic() + timeout)
        self.submit(req)
        text = []
        while True:
            try:
                event = sink.events.get(timeout=timeout + 30)
            except queue.Empty:
                req.cancel()
                raise LorakitError(f"no answer from the engine in {timeout:g} s") from None
            if event[0] == "delta":
                text.append(event[1])
            elif event[0] == "error":
                raise LorakitError(event[1])
            else:
                return {"text": "".join(text), "token_ids": list(req.output_ids),
                        "finish_reason": event[1], "prompt_tokens": len(req.prompt_ids),
                        "completion_tokens": len(req.output_ids)}

    def occupancy(self) -> dict:
        """How full the engine is: requests running in the batch, requests waiting, adapters
        resident in memory (for /health and /metrics)."""
        with self._lock:
            return {"running": len(self._rows), "waiting": len(self._waiting),
                    "resident_adapters": len(self._resident)}

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop:
            try:
                self._apply_adapter_changes()
                self._admit()
                self._expire_rows()
                if not self._rows:
                    self._wakeup.wait(timeout=0.05)
                    self._wakeup.clear()
                    continue
                self._decode_step()
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                self._fail_rows(f"internal error during generation: {type(exc).__name__}: {exc}")

    def _fail_rows(self, message: str) -> None:
        rows, self._rows, self._cache, self._mask = self._rows, [], None, None
        for r in rows:
            r.end(("error", message, 500))

    def _expire_rows(self) -> None:
        """Rows past their deadline end with an error (504); the others go on."""
        now = time.monotonic()
        late = [i for i, r in enumerate(self._rows) if r.deadline is not None and now > r.deadline]
        if not late:
            return
        for i in late:
            self._rows[i].end(("error", "the request did not finish before its deadline "
                                        "(--request-timeout)", 504))
        self._drop_rows([i for i in range(len(self._rows)) if i not in late])

    def _admit(self) -> None:
        """Move waiting requests whose adapter is resident into the batch (FIFO, skipping
        requests whose adapter is still being read)."""
        admitted, ended = [], []
        now = time.monotonic()
        with self._lock:
            room = self.max_batch_size - len(self._rows)
            for req in list(self._waiting):
                if req.cancelled:
                    self._waiting.remove(req)
                    ended.append((req, ("done", "cancelled")))
                    continue
                if req.deadline is not None and now > req.deadline:
                    self._waiting.remove(req)
                    ended.append((req, ("error", "the request did not start before its "
                                                 "deadline (--request-timeout)", 504)))
                    continue
                if room <= 0:
                    continue
                if req.slot is not None and req.slot not in self._resident:
                    entry = self._slots.get(req.slot)
                    if entry is None or entry.state == "failed":
                        self._waiting.remove(req)
                        ended.append((req, ("error", f"The model `{req.adapter}` does not "
                                                     f"exist.", 404)))
                    else:
                        self._request_load(req.slot)
                    continue
                if req.slot is not None:
                    self._resident.move_to_end(req.slot)
                self._waiting.remove(req)
                admitted.append(req)
                room -= 1
        for req, event in ended:
            if event[0] == "done":
                req.finish_reason = "cancelled"
            req.end(event)
        for group in self._prefill_groups(admitted):
            self._prefill_together(group)

    def _prefill_groups(self, reqs: list[Request]) -> list[list[Request]]:
        """Consecutive groups whose padded prefill (rows x longest prompt) fits
        ``max_prefill_tokens`` (a longer prompt gets a group of its own)."""
        groups, current, longest = [], [], 0
        for req in reqs:
            n = len(req.prompt_ids)
            if current and (len(current) + 1) * max(longest, n) > self.max_prefill_tokens:
                groups.append(current)
                current, longest = [], 0
            current.append(req)
            longest = max(longest, n)
        if current:
            groups.append(current)
        return groups

    def _prefill_together(self, reqs: list[Request]) -> None:
        """Prefill ``reqs`` in one left-padded forward; if it raises, each alone (so only the
        requests whose adapter is at fault fail)."""
        if len(reqs) > 1:
            from transformers import DynamicCache

            ids, mask, positions = (t.to(self.device) for t in
                                    left_padded(r.prompt_ids for r in reqs))
            try:
                logits, cache = self._forward([r.slot for r in reqs], ids, mask, positions,
                                              DynamicCache())
            except Exception:  # noqa: BLE001 - retried one by one below, faults found there
                pass
            else:
                self.stats["prefills"] += 1
                self.stats["prefill_rows"] += len(reqs)
                self._start_rows(reqs, logits, cache, mask)
                return
        for req in reqs:
            try:
                self._prefill(req)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                self._row_fault([req], exc, "prefill")

    def _start_rows(self, reqs: list[Request], logits, cache, mask: torch.Tensor) -> None:
        """Sample each prefilled row's first token; the rows that go on join the batch."""
        keep = []
        for i, (req, token) in enumerate(zip(reqs, self._sample(reqs, logits))):
            if isinstance(token, Exception):
                self._sample_failed(req, token)
            elif not self._emit(req, token):  # not finished on its first token
                keep.append(i)
        if not keep:
            return
        if len(keep) < len(reqs):
            index = torch.tensor(keep, device=self.device)
            cache.batch_select_indices(index)
            mask = mask.index_select(0, index)
            mask = _trim_shared_padding(mask, cache)
        self._join([reqs[i] for i in keep], cache, mask)

    @torch.no_grad()
    def _forward(self, slots: list, input_ids, mask, positions, cache):
        from lorakit.lora.inject import mixed_batch

        kwargs = {self._cache_arg: cache}
        with mixed_batch(self.model, slots):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **kwargs)
        new_cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1, :].float(), new_cache

    def _probe(self, slot: str | None) -> Exception | None:
        """One token through the model with adapter ``slot`` alone: None if it works, else
        the error (tells an adapter's fault from a batch-wide one)."""
        from transformers import DynamicCache

        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        mask = torch.ones((1, 1), dtype=torch.long, device=self.device)
        try:
            logits, _ = self._forward([slot], ids, mask, torch.zeros_like(ids), DynamicCache())
        except Exception as exc:  # noqa: BLE001 - the answer
            return exc
        if not bool(torch.isfinite(logits).any()):
            return AdapterError("the forward produced no finite logit")
        return None

    def _row_fault(self, rows: list[Request], exc: Exception, where: str) -> list[Request]:
        """A forward for ``rows`` raised: find the adapters at fault (each probed alone);
        their requests fail and they are unloaded; returns the rows that must fail."""
        faulty = {}
        for slot in {r.slot for r in rows if r.slot is not None}:
            if self._probe(slot) is not None:
                faulty[slot] = self._slots[slot].name if slot in self._slots else slot
        if not faulty:  # no adapter to blame (the base itself, or memory): all of these fail
            for r in rows:
                r.end(("error", f"generation failed ({where}): {type(exc).__name__}: {exc}",
                       500))
            self.stats["row_errors"] += len(rows)
            return rows
        failed = [r for r in rows if r.slot in faulty]
        for r in failed:
            r.end(("error", f"adapter {faulty[r.slot]!r} failed during generation and was "
                            f"unloaded: {type(exc).__name__}: {exc}", 500))
        self.stats["row_errors"] += len(failed)
        self.stats["adapter_faults"] += len(faulty)
        for slot, name in faulty.items():
            self._fail_adapter(slot, f"adapter {name!r} failed during generation and was "
                                     f"unloaded: {type(exc).__name__}: {exc}")
        return failed

    def _prefill(self, req: Request) -> None:
        from transformers import DynamicCache

        n = len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        logits, cache = self._forward([req.slot], ids, mask, positions, DynamicCache())
        self.stats["prefills"] += 1
        self.stats["prefill_rows"] += 1
        self._start_rows([req], logits, cache, mask)

    def _join(self, reqs: list[Request], cache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the batch, left-padding the shorter side."""
        from transformers import DynamicCache

        if not self._rows:
            self._rows, self._cache, self._mask = list(reqs), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._rows.extend(reqs)

    def _decode_step(self) -> None:
        rows = self._rows
        last = torch.tensor([[r.output_ids[-1]] for r in rows], device=self.device)  # (B, 1)
        positions = self._mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens so far
        mask = torch.cat([self._mask, torch.ones_like(positions)], dim=1)
        width = self._mask.shape[1]
        try:
            logits, cache = self._forward([r.slot for r in rows], last, mask, positions,
                                          self._cache)
        except Exception as exc:  # noqa: BLE001 - find the rows at fault, keep the others
            self._restore_cache(width)
            failed = {id(r) for r in self._row_fault(rows, exc, "decode")}
            self._drop_rows([i for i, r in enumerate(rows) if id(r) not in failed])
            return
        self._cache, self._mask = cache, mask
        self.stats["steps"] += 1
        self.stats["step_rows"] += len(rows)
        tokens = self._sample(rows, logits)
        keep = []
        for i, (r, t) in enumerate(zip(rows, tokens)):
            if isinstance(t, Exception):
                self._sample_failed(r, t)
            elif not self._emit(r, t):
                keep.append(i)
        if len(keep) < len(rows):
            self._drop_rows(keep)

    def _restore_cache(self, width: int) -> None:
        """After a failed forward: cut the layers that already appended this step's key and
        value back to ``width`` columns, so the running rows' cache is as before the step."""
        for layer in getattr(self._cache, "layers", []):
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] > width:
                    setattr(layer, attr, t[..., :width, :])

    def _drop_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim columns that became padding in every row."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        if len(keep) == len(self._rows):
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(index)
        self._mask = _trim_shared_padding(self._mask.index_select(0, index), self._cache)

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list:
        """One token per row: argmax for temperature 0, else top-p sampling with the
        request's own generator (so a seeded request samples the same in any batch).

        A row whose probabilities are not finite (a denormal temperature, an adapter that
        yields NaN) gets an exception in its place; the other rows are sampled as usual."""
        greedy = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits).any(dim=-1).tolist()  # one check for the whole batch
        tokens: list = []
        for i, req in enumerate(rows):
            p = req.params
            if p.temperature == 0:
                tokens.append(greedy[i] if finite[i] else
                              ArithmeticError("the model produced no finite logit"))
                continue
            try:
                probs = torch.softmax(logits[i].cpu() / p.temperature, dim=-1)
                if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
                    raise ArithmeticError(
                        f"the token probabilities are not finite at temperature "
                        f"{p.temperature!r}" + (" (too close to 0: use temperature 0 for "
                                                "greedy decoding)" if p.temperature < 1e-3 else ""))
                if p.top_p < 1:
                    sorted_p, order = probs.sort(descending=True)
                    drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # smallest set >= top_p
                    sorted_p[drop] = 0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                tokens.append(int(torch.multinomial(probs, 1, generator=req.generator)))
            except Exception as exc:  # noqa: BLE001 - this row only
                tokens.append(exc)
        return tokens

    def _sample_failed(self, req: Request, exc: Exception) -> None:
        self.stats["row_errors"] += 1
        status = 400 if isinstance(exc, ArithmeticError) else 500
        req.end(("error", f"sampling failed: {exc}", status))

    def _emit(self, req: Request, token: int) -> bool:
        """Record ``token`` for ``req``, send new text; True when the request is finished."""
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if req.cancelled or req.ended:
            req.finish_reason = req.finish_reason or "cancelled"
            req.end(("done", "cancelled"))
            return True
        finish = None
        if token in self.eos_ids and not req.params.ignore_eos:
            finish = "stop"
        else:
            req.output_ids.append(token)
            req.text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
            cut = _first_stop(req.text, req.params.stop)
            if cut is not None:
                req.text, finish = req.text[:cut], "stop"
            elif len(req.output_ids) >= req.params.max_tokens:
                finish = "length"
        safe = len(req.text) if finish else _safe_length(req.text, req.params.stop)
        if safe > req.emitted:
            req.sink(("delta", req.text[req.emitted:safe]))
            req.emitted = safe
        if finish:
            req.finish_reason = finish
            req.end(("done", finish))
            return True
        return False


# ---------------------------------------------------------------------- helpers
def _trim_shared_padding(mask: torch.Tensor, cache) -> torch.Tensor:
    """Cut the left columns that are padding in every row, from ``mask`` and from ``cache``'s
    keys and values (in place); returns the mask."""
    lead = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())
    if lead:
        mask = mask[:, lead:]
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, lead:]
            layer.values = layer.values[:, :, lead:]
    return mask


def _left_pad(t: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` to ``width`` (keys/values: dim -2; masks: dim 1)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be streamed now: hold back an incomplete UTF-8 character
    and any tail that could still grow into a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return n


def _stop_token_ids(tokenizer, model) -> set[int]:
    """EOS of the tokenizer and generation config, plus common end-of-turn tokens."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None),
                                                  "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids
