r"""The serving engine: one base model, many LoRA adapters, continuous batching with a KV cache.

One background thread owns the model. Each loop turn it

1. applies adapter installs / removals that are ready (between forwards, so nothing races),
2. admits waiting requests whose adapter is resident: each is prefilled alone (a batch of one,
   so its prompt is computed exactly as if it ran alone) and its KV cache joins the batch,
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

import inspect
import itertools
import queue
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lorakit.errors import AdapterError, ConfigError, LorakitError
from lorakit.serve import adapters as adapter_files


class ModelNotFound(LorakitError):
    """A request names a model (base or adapter) the server does not serve."""


class PromptTooLong(LorakitError):
    """Prompt (plus requested tokens) longer than ``max_model_len``."""


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
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ConfigError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ConfigError("stop takes at most 4 non-empty strings")


_ids = itertools.count()


@dataclass
class Request:
    """One generation request; events go to ``sink`` from the engine thread.

    Events: ``("delta", text)`` for new text, then ``("done", finish_reason)`` or
    ``("error", message)``. ``finish_reason`` is "stop" (EOS or a stop string) or "length".
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

    def cancel(self) -> None:
        """Stop generating for this request (e.g. its streaming client disconnected)."""
        self.cancelled = True


class _SyncSink:
    """Collects a request's events for blocking callers (tests, benchmarks, the CLI)."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event: tuple) -> None:
        self.events.put(event)


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
    """

    def __init__(self, model, tokenizer, *, base_name: str = "base",
                 adapter_root: str | Path | None = None, max_loaded_adapters: int = 8,
                 max_batch_size: int = 16, max_model_len: int | None = None):
        if max_loaded_adapters < 1 or max_batch_size < 1:
            raise ConfigError("max_loaded_adapters and max_batch_size must be >= 1")
        if getattr(model, "lorakit_adapters", None):
            raise ConfigError("pass the engine a base model without adapters; register adapters "
                              "with Engine.add_adapter(name, path)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.max_loaded_adapters = max_loaded_adapters
        self.max_batch_size = max_batch_size
        config_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = int(max_model_len or config_len)
        self.device = next(model.parameters()).device
        emb = model.get_input_embeddings().weight
        self.adapter_dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
        self.signature = adapter_files.base_signature(model)
        self.eos_ids = _stop_token_ids(tokenizer, model)
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        self.created = int(time.time())

        self._lock = threading.Lock()  # guards the registry, the waiting queue and counters
        self._wakeup = threading.Event()
        self._registry: dict[str, Path] = {}  # adapters clients may ask for
        self._resident: OrderedDict[str, None] = OrderedDict()  # in the model, LRU order
        self._loading: dict[str, Future] = {}  # reads in progress on the worker pool
        self._ready: queue.Queue = queue.Queue()  # (name, prepared|exception, Future)
        self._unload: queue.Queue = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []
        self._cache = None  # DynamicCache of the running rows
        self._mask: torch.Tensor | None = None  # (rows, L) 1 = real token
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lorakit-adapter-read")
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"steps": 0, "step_rows": 0, "adapter_loads": 0, "adapter_evictions": 0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> dict[str, Path]:
        """Registered adapters (name -> folder), resident or not."""
        with self._lock:
            return dict(self._registry)

    def resident_adapters(self) -> list[str]:
        """Adapters currently in the model, least recently used first."""
        with self._lock:
            return list(self._resident)

    def add_adapter(self, name: str, path: str | Path, *, check_root: bool = False,
                    wait: bool = True, timeout: float = 120) -> Path:
        """Register adapter ``name`` from ``path`` and load it (hot: generation goes on).

        Args:
            check_root: require ``path`` to stay inside ``adapter_root`` (runtime loads).
            wait: block until the adapter is resident (the LRU may evict others for it).

        Raises:
            AdapterError: name taken or reserved, unsafe path, or the adapter does not fit
                the base (the message says why).
        """
        if not name or name == self.base_name:
            raise AdapterError(f"adapter name {name!r} is empty or the base model's name")
        folder = adapter_files.resolve_under_root(self.adapter_root, path) if check_root \
            else Path(path).resolve()
        prepared = adapter_files.prepare(folder, self.signature)  # raises before registering
        with self._lock:
            if name in self._registry:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
            self._registry[name] = folder
            future: Future = Future()
            self._loading[name] = future
        self._ready.put((name, prepared, future))
        self._wakeup.set()
        if wait:
            future.result(timeout=timeout)
        return folder

    def remove_adapter(self, name: str) -> None:
        """Unregister adapter ``name``; it leaves the model once no running request uses it.

        Raises:
            ModelNotFound: no such adapter.
        """
        with self._lock:
            if name not in self._registry:
                raise ModelNotFound(f"The lora adapter '{name}' cannot be found.")
            del self._registry[name]
        self._unload.put(name)
        self._wakeup.set()

    def _request_load(self, name: str) -> None:
        """Start reading an evicted adapter again on the worker pool (engine thread)."""
        path = self._registry.get(name)
        if path is None or name in self._loading:
            return
        future: Future = Future()
        self._loading[name] = future

        def read():
            try:
                self._ready.put((name, adapter_files.prepare(path, self.signature), future))
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting requests
                self._ready.put((name, exc, future))
            self._wakeup.set()

        self._pool.submit(read)

    def _apply_adapter_changes(self) -> None:
        """Installs and removals, between forwards (engine thread only)."""
        in_use = {r.adapter for r in self._rows}
        while True:
            try:
                name = self._unload.get_nowait()
            except queue.Empty:
                break
            if name in in_use:
                self._unload.put(name)  # retry when its requests have finished
                break
            if name in self._resident:
                adapter_files.uninstall(self.model, name)
                with self._lock:
                    self._resident.pop(name, None)
        deferred = []
        while True:
            try:
                name, prepared, future = self._ready.get_nowait()
            except queue.Empty:
                break
            if isinstance(prepared, Exception):
                with self._lock:
                    self._loading.pop(name, None)
                future.set_exception(prepared)
                self._fail_waiting(name, f"adapter {name!r} could not be loaded: {prepared}")
                continue
            if name not in self._registry:  # unloaded while being read
                with self._lock:
                    self._loading.pop(name, None)
                future.set_result(None)
                continue
            if len(self._resident) >= self.max_loaded_adapters and not self._evict(in_use):
                deferred.append((name, prepared, future))  # every slot busy: try next step
                continue
            adapter_files.install(self.model, name, prepared, self.adapter_dtype)
            with self._lock:
                self._resident[name] = None
                self._loading.pop(name, None)
            self.stats["adapter_loads"] += 1
            future.set_result(None)
        for item in deferred:
            self._ready.put(item)

    def _evict(self, in_use: set) -> bool:
        for name in self._resident:  # least recently used first
            if name not in in_use:
                adapter_files.uninstall(self.model, name)
                with self._lock:
                    self._resident.pop(name)
                self.stats["adapter_evictions"] += 1
                return True
        return False

    def _fail_waiting(self, adapter: str, message: str) -> None:
        with self._lock:
            failed = [r for r in self._waiting if r.adapter == adapter]
            for r in failed:
                self._waiting.remove(r)
        for r in failed:
            r.sink(("error", message))

    # ------------------------------------------------------------------ requests
    def resolve_model(self, model: str) -> str | None:
        """The adapter a ``model`` field names (None: the base).

        Raises:
            ModelNotFound: neither the base nor a registered adapter.
        """
        if model == self.base_name:
            return None
        with self._lock:
            if model in self._registry:
                return model
            known = [self.base_name, *self._registry]
        raise ModelNotFound(f"The model `{model}` does not exist. Served models: "
                            f"{', '.join(known)}")

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
        """Queue a request; it joins the running batch at the next decode step."""
        request.params.validate()
        self.check_length(request.prompt_ids, request.params)
        if request.params.temperature > 0:
            request.generator = torch.Generator()
            if request.params.seed is not None:
                request.generator.manual_seed(int(request.params.seed))
            else:
                request.generator.seed()
        with self._lock:
            if request.adapter is not None and request.adapter not in self._registry:
                raise ModelNotFound(f"The model `{request.adapter}` does not exist.")
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
        req = self.submit(Request(list(prompt_ids), adapter, params or SamplingParams(), sink))
        deadline = time.monotonic() + timeout
        text = []
        while True:
            kind, value = sink.events.get(timeout=max(0.0, deadline - time.monotonic()))
            if kind == "delta":
                text.append(value)
            elif kind == "error":
                raise LorakitError(value)
            else:
                return {"text": "".join(text), "token_ids": list(req.output_ids),
                        "finish_reason": value, "prompt_tokens": len(req.prompt_ids),
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
            r.sink(("error", message))

    def _admit(self) -> None:
        """Move waiting requests whose adapter is resident into the batch (FIFO, skipping
        requests whose adapter is still being read)."""
        admitted = []
        with self._lock:
            room = self.max_batch_size - len(self._rows)
            for req in list(self._waiting):
                if room <= 0:
                    break
                if req.cancelled:
                    self._waiting.remove(req)
                    continue
                if req.adapter is not None and req.adapter not in self._resident:
                    if req.adapter not in self._registry:
                        self._waiting.remove(req)
                        req.sink(("error", f"The model `{req.adapter}` does not exist."))
                    else:
                        self._request_load(req.adapter)
                    continue
                if req.adapter is not None:
                    self._resident.move_to_end(req.adapter)
                self._waiting.remove(req)
                admitted.append(req)
                room -= 1
        for req in admitted:
            try:
                self._prefill(req)
            except Exception as exc:  # noqa: BLE001 - only this request fails
                req.sink(("error", f"prefill failed: {type(exc).__name__}: {exc}"))

    @torch.no_grad()
    def _forward(self, adapters: list, input_ids, mask, positions, cache):
        from lorakit.lora.inject import mixed_batch

        kwargs = {self._cache_arg: cache}
        with mixed_batch(self.model, adapters):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **kwargs)
        new_cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        return out.logits[:, -1, :].float(), new_cache

    def _prefill(self, req: Request) -> None:
        from transformers import DynamicCache

        n = len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        mask = torch.ones((1, n), dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        logits, cache = self._forward([req.adapter], ids, mask, positions, DynamicCache())
        if self._emit(req, self._sample([req], logits)[0]):
            return  # finished on its first token
        self._join(req, cache, mask)

    def _join(self, req: Request, cache, mask: torch.Tensor) -> None:
        """Append one prefilled row to the batch, left-padding the shorter side."""
        from transformers import DynamicCache

        if not self._rows:
            self._rows, self._cache, self._mask = [req], cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
            layers.append((keys, values))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._rows.append(req)

    def _decode_step(self) -> None:
        rows = self._rows
        last = torch.tensor([[r.output_ids[-1]] for r in rows], device=self.device)  # (B, 1)
        positions = self._mask.sum(dim=1, keepdim=True)  # (B, 1): real tokens so far
        mask = torch.cat([self._mask, torch.ones_like(positions)], dim=1)
        logits, self._cache = self._forward([r.adapter for r in rows], last, mask, positions,
                                            self._cache)
        self._mask = mask
        self.stats["steps"] += 1
        self.stats["step_rows"] += len(rows)
        tokens = self._sample(rows, logits)
        keep = [i for i, (r, t) in enumerate(zip(rows, tokens)) if not self._emit(r, t)]
        if len(keep) < len(rows):
            self._drop_rows(keep)

    def _drop_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; trim columns that became padding in every row."""
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        lead = int((self._mask.cumsum(dim=1) == 0).sum(dim=1).min())  # shared left padding
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> list[int]:
        """One token per row: argmax for temperature 0, else top-p sampling with the
        request's own generator (so a seeded request samples the same in any batch)."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, req in enumerate(rows):
            p = req.params
            if p.temperature == 0:
                tokens.append(greedy[i])
                continue
            probs = torch.softmax(logits[i].cpu() / p.temperature, dim=-1)
            if p.top_p < 1:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest set >= top_p
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            tokens.append(int(torch.multinomial(probs, 1, generator=req.generator)))
        return tokens

    def _emit(self, req: Request, token: int) -> bool:
        """Record ``token`` for ``req``, send new text; True when the request is finished."""
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if req.cancelled:
            req.finish_reason = "cancelled"
            req.sink(("done", "cancelled"))
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
            req.sink(("done", finish))
            return True
        return False


# ---------------------------------------------------------------------- helpers
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
