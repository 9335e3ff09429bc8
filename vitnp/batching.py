"""Dynamic batching between the HTTP layer and the engine: one engine worker per model, a model registry,
and a bounded LRU cache of results.

This layer never sees HTTP: it takes image bytes plus raw parameter values and returns plain lists of
{"label", "score"} dicts, or raises vitnp errors (ImageError, ParameterError, ModelNotFoundError, ...) and
the two errors defined here (QueueFullError, ModelLoadingError) for the HTTP layer to map to statuses.

Per request: look up the model (loading it on demand if allowed), validate the parameters, consult the
result cache, take a queue slot, decode + preprocess the image on a thread pool (so one bad image fails
only its own request), then hand the pixel values to the model's engine worker. The worker thread groups
queued requests into one forward pass (up to max_batch_size, waiting at most max_wait for the batch to
fill), and resolves each request's future with its own postprocessed result.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ModelNotFoundError, VitnpError
from .postprocess import validate_parameters

log = logging.getLogger("vitnp.server")

BUNDLED_PREFIX = "bundled:"
_BUNDLED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Before any on-demand load has been timed, tell clients to retry after this many seconds.
DEFAULT_LOAD_ESTIMATE_S = 10.0
# Bodies above this size are hashed on the thread pool instead of the event loop.
HASH_OFF_LOOP_BYTES = 1 << 20
# How long a batch may wait past max_wait for admitted requests that are still being decoded, and how
# often it looks whether they have arrived (a failed decode withdraws its request without a signal).
DECODE_GRACE_S = 0.1
GRACE_POLL_S = 0.002
# A failed on-demand load is answered from memory for this long instead of being retried.
FAILED_LOAD_MEMORY_S = 60.0


# Forward passes of different models (and warm-ups of models loading on demand) take turns: each one
# already uses every core, and Numba's workqueue threading layer aborts on concurrent parallel launches.
FORWARD_LOCK = threading.Lock()


class QueueFullError(VitnpError):
    """The model's request queue is full; the client should retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadingError(VitnpError):
    """The model is being loaded on demand; the client should retry after estimated_time seconds."""

    def __init__(self, model: str, estimated_time: float):
        super().__init__(f"Model {model} is currently loading")
        self.model = model
        self.estimated_time = estimated_time


class ModelUnavailableError(VitnpError):
    """An on-demand model exists but could not be loaded (not a supported checkpoint, or broken)."""


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 8
    max_wait_s: float = 0.005
    max_queue: int = 64


@dataclass
class Classification:
    """What one request gets back: the labels plus what the HTTP layer reports in headers and logs."""

    predictions: list[dict]
    model: str
    cache_hit: bool
    batch_size: int  # images in the forward pass that computed this result (0 for a cache hit)
    compute_seconds: float


@dataclass
class _Job:
    pixels: np.ndarray  # (1, 3, H, W) float32
    top_k: int
    function_to_apply: str | None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class ModelWorker:
    """One model as the service sees it: admission (queue limit), decoding, and `submit`, which the
    subclass implements with its own way of batching forward passes (EngineWorker: a thread here;
    vitnp.ray: Ray Serve's @serve.batch)."""

    def __init__(self, name: str, classifier, options: BatchingOptions, aliases: tuple[str, ...] = ()):
        self.name = name
        self.classifier = classifier
        self.options = options
        self.aliases = aliases
        self.cache_identity = (name, classifier.revision)
        # Requests admitted but not yet in a forward pass (being decoded, or waiting for their batch).
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def num_labels(self) -> int:
        return self.classifier.config.num_labels

    @property
    def waiting(self) -> int:
        return self._waiting

    def info(self) -> dict:
        c = self.classifier.config
        return {
            "model_id": self.name,
            "aliases": list(self.aliases),
            "revision": self.classifier.revision,
            "architecture": c.architecture,
            "num_labels": c.num_labels,
            "image_size": c.image_size,
            "max_batch_size": self.options.max_batch_size,
            "queued": self._waiting,
            "status": "loaded",
        }

    def admit(self) -> None:
        with self._waiting_lock:
            if self._waiting >= self.options.max_queue:
                raise QueueFullError(f"Model {self.name} is overloaded: {self._waiting} requests are queued; "
                                     "retry later")
            self._waiting += 1

    def withdraw(self) -> None:
        """An admitted request that will not reach the engine (its image failed to decode)."""
        with self._waiting_lock:
            self._waiting -= 1

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> (1, 3, H, W) pixel values. Runs on the decode thread pool, never on the worker."""
        return self.classifier.preprocess([data])

    def submit(self, pixels: np.ndarray, top_k: int, function_to_apply: str | None):
        """A future (concurrent or asyncio) of (predictions, batch size) for one admitted, decoded image."""
        raise NotImplementedError

    def close(self, timeout: float | None = None) -> None:
        raise NotImplementedError


class EngineWorker(ModelWorker):
    """One model and the one thread that runs its forward passes."""

    def __init__(self, name: str, classifier, options: BatchingOptions, aliases: tuple[str, ...] = ()):
        super().__init__(name, classifier, options, aliases)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        c = classifier.config
        self._batch = np.empty((options.max_batch_size, c.num_channels, c.image_size, c.image_size), np.float32)
        self._thread = threading.Thread(target=self._run, name=f"vitnp-engine[{name}]", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray, top_k: int, function_to_apply: str | None) -> concurrent.futures.Future:
        job = _Job(pixels, top_k, function_to_apply)
        self._jobs.put(job)
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued job, then stop the thread."""
        self._jobs.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        # The classifier applies its thread count in whichever thread runs the forward pass.
        while True:
            first = self._jobs.get()
            if first is _STOP:
                return
            batch, stop = self._collect(first)
            self._run_batch(batch)
            if stop:
                self._drain_after_stop()
                return

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """Take up to max_batch_size jobs, waiting up to max_wait_s after the first for more to come.

        Past max_wait_s it still waits (up to DECODE_GRACE_S) for requests that are already admitted and
        only being decoded: clients answered by one forward pass send their next requests together, and a
        batch that left a few milliseconds too early would run the stragglers as a slow second batch.
        """
        batch = [first]
        start = time.monotonic()
        deadline = start + self.options.max_wait_s
        grace_deadline = start + max(self.options.max_wait_s, DECODE_GRACE_S)
        while len(batch) < self.options.max_batch_size:
            now = time.monotonic()
            if now < deadline:
                timeout = deadline - now
            elif self._waiting > len(batch) and now < grace_deadline:
                timeout = min(GRACE_POLL_S, grace_deadline - now)
            else:
                timeout = 0.0
            try:
                job = self._jobs.get(timeout=timeout) if timeout > 0 else self._jobs.get_nowait()
            except queue.Empty:
                if timeout == 0.0:
                    break
                continue
            if job is _STOP:
                return batch, True
            batch.append(job)
        return batch, False

    def _drain_after_stop(self) -> None:
        # Jobs submitted after close() (requests still decoding when shutdown began) are still answered.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                self._run_batch([job])

    def _run_batch(self, batch: list[_Job]) -> None:
        n = len(batch)
        with self._waiting_lock:
            self._waiting -= n
        try:
            for i, job in enumerate(batch):
                self._batch[i] = job.pixels[0]
            with FORWARD_LOCK:
                logits = self.classifier.logits(self._batch[:n])
            for i, job in enumerate(batch):
                predictions = self.classifier.postprocess(logits[i:i + 1], job.top_k, job.function_to_apply)[0]
                job.future.set_result((predictions, n))
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("forward pass failed for model %s (batch of %d)", self.name, n)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)


@dataclass
class _Loading:
    started: float
    future: asyncio.Future


class ModelRegistry:
    """Name -> EngineWorker for command-line models, plus on-demand loading of Hub ids / bundled models.

    A name from a URL is only ever looked up as an alias of a loaded model, a bundled:<name>, or a Hub id
    resolved through huggingface_hub's cache: never as a filesystem path.
    """

    def __init__(self, options: BatchingOptions, load_on_demand: bool = False, revision: str | None = None,
                 threads: int | None = None, backend: str = "auto", warmup: bool = True,
                 precision: str = "fp32"):
        self.options = options
        self.precision = precision
        self.load_on_demand = load_on_demand
        self.revision = revision
        self.threads = threads
        self.backend = backend
        self.warmup = warmup
        self.default: str | None = None
        self._workers: dict[str, EngineWorker] = {}   # canonical name -> worker
        self._names: dict[str, str] = {}              # canonical name or alias -> canonical name
        self._loading: dict[str, _Loading] = {}
        self._failed: dict[str, tuple[float, VitnpError]] = {}
        self._load_seconds: list[float] = []
        self._closed = False

    # ------------------------------------------------------------------ startup (before the port opens)

    def load_startup_model(self, spec: str, alias: str | None = None) -> EngineWorker:
        """Load + warm a model named on the command line (hub id, directory or bundled:<name>)."""
        import vitnp

        t0 = time.perf_counter()
        clf = vitnp.load(spec, revision=self.revision, backend=self.backend, threads=self.threads, progress=False,
                         precision=self.precision)
        name, aliases = _startup_names(spec, alias)
        if name in self._names:
            raise ModelNotFoundError(f"two --model arguments are both named {name!r}; name them with "
                                     f"--model NAME=DIR")
        aliases = tuple(a for a in aliases if a not in self._names)
        worker = self._start_worker(name, clf, aliases)
        self._load_seconds.append(time.perf_counter() - t0)
        self._add(worker)
        return worker

    def add_worker(self, worker: ModelWorker) -> None:
        """Serve an already-loaded model (its name and aliases come with the worker)."""
        if worker.name in self._names:
            raise ModelNotFoundError(f"two models are both named {worker.name!r}")
        worker.aliases = tuple(a for a in worker.aliases if a not in self._names)
        self._add(worker)

    def _add(self, worker: EngineWorker) -> None:
        self._workers[worker.name] = worker
        for n in (worker.name, *worker.aliases):
            self._names[n] = worker.name
        if self.default is None:
            self.default = worker.name

    def _start_worker(self, name: str, clf, aliases: tuple[str, ...]) -> EngineWorker:
        if self.warmup:
            sizes = (1, self.options.max_batch_size) if self.options.max_batch_size > 1 else (1,)
            with FORWARD_LOCK:
                seconds = clf.warmup(sizes)
            log.info("model %s warmed up for batch sizes %s in %.1fs", name, sizes, seconds)
        return EngineWorker(name, clf, self.options, aliases=aliases)

    # ------------------------------------------------------------------ lookup

    def models(self) -> list[dict]:
        out = []
        for name, worker in self._workers.items():
            entry = worker.info()
            entry["default"] = name == self.default
            out.append(entry)
        for name, loading in self._loading.items():
            out.append({"model_id": name, "status": "loading", "estimated_time": self._estimated_time(loading)})
        return out

    def lookup(self, name: str) -> EngineWorker | None:
        canonical = self._names.get(name)
        return self._workers.get(canonical) if canonical is not None else None

    async def get(self, name: str | None, wait_for_model: bool = False) -> EngineWorker:
        """The worker for a model name from a request; may start an on-demand load (ModelLoadingError)."""
        if name is None:
            if self.default is None:
                raise ModelNotFoundError("this server has no default model: POST to /models/<model id>")
            name = self.default
        worker = self.lookup(name)
        if worker is not None:
            return worker
        loading = self._loading.get(name)
        if loading is None:
            _check_url_model_name(name)
            if not self.load_on_demand or self._closed:
                raise ModelNotFoundError(f"Model {name} is not loaded on this server")
            self._raise_recent_failure(name)
            # Find out whether the model exists before promising it with a 503.
            await asyncio.get_running_loop().run_in_executor(None, self._check_exists, name)
            worker = self.lookup(name)  # another request may have finished loading it meanwhile
            if worker is not None:
                return worker
            loading = self._loading.get(name) or self._start_loading(name)
        if not wait_for_model:
            raise ModelLoadingError(name, self._estimated_time(loading))
        return await asyncio.shield(loading.future)

    def _raise_recent_failure(self, name: str) -> None:
        failed = self._failed.get(name)
        if failed is not None:
            when, error = failed
            if time.monotonic() - when < FAILED_LOAD_MEMORY_S:
                raise error
            del self._failed[name]

    def _check_exists(self, name: str) -> None:
        """Raise ModelNotFoundError unless name is a bundled model or a Hub repo with a config.json."""
        if name.startswith(BUNDLED_PREFIX):
            from .hub import bundled_models

            if name not in bundled_models():
                raise ModelNotFoundError(f"Model {name} does not exist")
            return
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            hf_hub_download(name, "config.json", revision=self.revision)
        except EntryNotFoundError:
            raise ModelNotFoundError(f"Model {name} has no config.json, so it is not a model this server "
                                     "can load") from None
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(f"Model {name} is not in this server's Hugging Face cache and the Hub is "
                                     "unreachable") from None
        except (HfHubHTTPError, OSError, ValueError) as e:
            log.info("existence check for %s failed: %s", name, e)
            raise ModelNotFoundError(f"Model {name} does not exist") from None

    def _estimated_time(self, loading: _Loading) -> float:
        expected = max(self._load_seconds) if self._load_seconds else DEFAULT_LOAD_ESTIMATE_S
        return round(max(1.0, expected - (time.monotonic() - loading.started)), 1)

    def _start_loading(self, name: str) -> _Loading:
        loop = asyncio.get_running_loop()
        loading = _Loading(time.monotonic(), loop.create_future())
        self._loading[name] = loading
        threading.Thread(target=self._load_on_demand, args=(name, loop, loading.future),
                         name=f"vitnp-load[{name}]", daemon=True).start()
        log.info("loading model %s on demand", name)
        return loading

    def _load_on_demand(self, name: str, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        t0 = time.perf_counter()
        try:
            worker = self._load_url_model(name)
        except Exception as e:  # noqa: BLE001 - reported to the waiting requests, logged here
            if isinstance(e, (ModelNotFoundError, ConnectionError)):
                log.warning("on-demand load of %s failed: %s", name, e)
                error: BaseException = ModelNotFoundError(f"Model {name} does not exist or is not available "
                                                          "on this server")
            elif isinstance(e, VitnpError):
                log.warning("on-demand load of %s failed: %s", name, e)
                error = ModelUnavailableError(f"Model {name} cannot be served: it is not a supported "
                                              "ViT/DeiT image-classification checkpoint")
            else:
                log.exception("on-demand load of %s failed", name)
                error = e
            loop.call_soon_threadsafe(self._finish_loading, name, future, None, error)
            return
        seconds = time.perf_counter() - t0
        self._load_seconds.append(seconds)
        log.info("model %s loaded on demand in %.1fs", name, seconds)
        loop.call_soon_threadsafe(self._finish_loading, name, future, worker, None)

    def _load_url_model(self, name: str) -> EngineWorker:
        import vitnp

        if not name.startswith(BUNDLED_PREFIX) and os.path.lexists(name):
            # vitnp.load reads an existing directory before trying the Hub; a URL must never pick a path.
            raise ModelNotFoundError(f"{name!r} names a local path, which a URL may not load")
        clf = vitnp.load(name, revision=None if name.startswith(BUNDLED_PREFIX) else self.revision,
                         backend=self.backend, threads=self.threads, progress=False, precision=self.precision)
        return self._start_worker(name, clf, ())

    def _finish_loading(self, name: str, future: asyncio.Future, worker: EngineWorker | None,
                        error: BaseException | None) -> None:
        self._loading.pop(name, None)
        if worker is not None:
            if self._closed:
                worker.close()
            else:
                self._add(worker)
            future.set_result(worker)
            return
        if isinstance(error, VitnpError):
            self._failed[name] = (time.monotonic(), error)
        future.set_exception(error)
        # Nobody may be waiting for this load; mark the exception as seen so asyncio does not log it.
        future.exception()

    def close(self) -> None:
        """Stop every engine worker after it has finished its queued jobs."""
        self._closed = True
        for worker in self._workers.values():
            worker.close()


def _check_url_model_name(name: str) -> None:
    """A model name from a URL must be a valid Hub id or bundled:<name>; anything else is unknown."""
    if name.startswith(BUNDLED_PREFIX):
        if _BUNDLED_NAME.fullmatch(name[len(BUNDLED_PREFIX):]) and ".." not in name:
            return
        raise ModelNotFoundError(f"Model {name} does not exist")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(f"Model {name} does not exist (not a valid Hugging Face Hub model id)") from None


def _startup_names(spec: str, alias: str | None) -> tuple[str, tuple[str, ...]]:
    """Canonical name + aliases under which a command-line model answers.

    A hub id or bundled name is its own name. A directory answers to NAME (from --model NAME=DIR) and to its
    directory name, when that is a valid Hub id, so that every name can appear in /models/<name>. A
    directory with neither keeps its path as its name: reachable through POST / when it is the default.
    """
    from .hub import is_hub_id

    candidates: list[str] = []
    if alias:
        candidates.append(alias)
    if spec.startswith(BUNDLED_PREFIX) or (is_hub_id(spec) and not os.path.isdir(spec)):
        candidates.append(spec)
    else:
        base = os.path.basename(os.path.normpath(spec))
        if is_hub_id(base):
            candidates.append(base)
    if not candidates:
        candidates.append(spec)
    unique = list(dict.fromkeys(candidates))
    return unique[0], tuple(unique[1:])


class ResultCache:
    """Bounded LRU of (model identity, image digest, parameters) -> predictions. Event-loop thread only."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key):
        predictions = self._entries.get(key)
        if predictions is not None:
            self._entries.move_to_end(key)
        return predictions

    def put(self, key, predictions: list[dict]) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = predictions
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class InferenceService:
    """The one object the HTTP layer talks to."""

    def __init__(self, registry: ModelRegistry, cache_size: int = 1024, decode_threads: int = 2):
        self.registry = registry
        self.cache = ResultCache(cache_size)
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(decode_threads, thread_name_prefix="vitnp-decode")

    async def classify(self, model: str | None, image: bytes, top_k=None, function_to_apply=None,
                       use_cache: bool = True, wait_for_model: bool = False) -> Classification:
        """Predictions for one image; raises vitnp errors (ImageError, ParameterError, ModelNotFoundError,
        QueueFullError, ModelLoadingError, ...)."""
        worker = await self.registry.get(model, wait_for_model)
        t0 = time.perf_counter()
        top_k, function_to_apply = validate_parameters(top_k, function_to_apply, worker.num_labels)
        loop = asyncio.get_running_loop()
        if len(image) > HASH_OFF_LOOP_BYTES:
            digest = await loop.run_in_executor(self._decode_pool, _digest, image)
        else:
            digest = _digest(image)
        key = (worker.cache_identity, digest, top_k, function_to_apply)
        if use_cache:
            cached = self.cache.get(key)
            if cached is not None:
                return Classification(cached, worker.name, True, 0, time.perf_counter() - t0)

        worker.admit()
        try:
            pixels = await loop.run_in_executor(self._decode_pool, worker.decode, image)
        except BaseException:
            worker.withdraw()
            raise
        predictions, batch_size = await asyncio.wrap_future(worker.submit(pixels, top_k, function_to_apply))
        self.cache.put(key, predictions)
        return Classification(predictions, worker.name, False, batch_size, time.perf_counter() - t0)

    def models(self) -> list[dict]:
        return self.registry.models()

    def close(self) -> None:
        self.registry.close()
        self._decode_pool.shutdown(wait=True)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
