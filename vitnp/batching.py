"""Dynamic batching between the HTTP layer and the engine: one worker per model, and a bounded LRU cache of
results (the models by name: vitnp.registry).

This layer never sees HTTP: it takes a request's images (bytes) plus raw parameter values and returns plain
lists of {"label", "score"} dicts, or raises vitnp errors (ImageError, ParameterError, ModelNotFoundError,
QueueFullError, ModelLoadingError, DeadlineExceededError, ...; vitnp.errors says which status each is) for the
HTTP layer to map to statuses. It records the metrics (vitnp.metrics) of everything below HTTP.

Per request: look up the model in the registry (waiting for it while it loads), validate the parameters,
consult the result cache per image, admit the missing images against the queue limit together, decode +
preprocess them on a thread pool (so one bad image fails only its own request), then hand the pixel values to
the model's engine worker as one job per image. The worker thread groups queued jobs into one forward pass
(up to max_batch_size, waiting at most max_wait for the batch to fill), drops the jobs whose deadline has
passed, and resolves each job's future with its own postprocessed result.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import DeadlineExceededError, ImageError, NonFiniteScoresError, ParameterError, QueueFullError
from .logs import REQUEST_ID, run_with_context
from .metrics import Metrics
from .options import ServingOptions
from .postprocess import check_finite, validate_parameters

log = logging.getLogger("vitnp.server")

# Bodies above this size are hashed on the thread pool instead of the event loop.
HASH_OFF_LOOP_BYTES = 1 << 20
# How long a batch may wait past max_wait for admitted requests that are still being decoded, and how
# often it looks whether they have arrived (a failed decode withdraws its request without a signal).
DECODE_GRACE_S = 0.1
GRACE_POLL_S = 0.002
# An engine busy with one forward pass for longer than this is not answering (readiness says so).
ENGINE_STALL_S = 60.0


# Forward passes of different models (and warm-ups of models loading on demand) take turns: each one
# already uses every core, and Numba's workqueue threading layer aborts on concurrent parallel launches.
FORWARD_LOCK = threading.Lock()


@dataclass
class Classification:
    """What one request gets back: the labels plus what the HTTP layer reports in headers and logs."""

    predictions: list[dict]
    model: str
    cache_hit: bool
    batch_size: int  # images in the forward pass that computed this result (0 for a cache hit)
    compute_seconds: float


class Job:
    """One admitted, decoded image and its parameters, waiting for a forward pass.

    A job leaves the queue once: into a forward pass (`start` -> "run"), dropped by the worker because its
    deadline has passed (`start` -> "expired": the worker answers DeadlineExceededError), or given up by its
    request at the deadline (`give_up`, True when the job had not started: the request withdraws it).
    """

    __slots__ = ("pixels", "top_k", "function_to_apply", "deadline", "admitted", "request_id", "_state", "_lock")

    def __init__(self, pixels: np.ndarray, top_k: int, function_to_apply: str | None, deadline: float | None = None,
                 admitted: float | None = None):
        self.pixels = pixels  # (1, 3, H, W) float32
        self.top_k = top_k
        self.function_to_apply = function_to_apply
        self.deadline = deadline  # time.monotonic() value, or None
        self.admitted = time.monotonic() if admitted is None else admitted
        self.request_id = REQUEST_ID.get()  # of the request that made it (for the engine thread's log lines)
        self._state = "queued"
        self._lock = threading.Lock()

    def start(self, now: float) -> str:
        """The worker takes the job: "run", "expired" (its deadline passed: dropped now) or "gone" (its request
        gave up on it)."""
        with self._lock:
            if self._state != "queued":
                return "gone"
            expired = self.deadline is not None and now >= self.deadline
            self._state = "expired" if expired else "running"
            return self._state if expired else "run"

    def give_up(self) -> bool:
        """The request stops waiting: True if the job had not left the queue (it never will now)."""
        with self._lock:
            if self._state != "queued":
                return False
            self._state = "gone"
            return True


_STOP = object()


class ModelWorker:
    """One model as the service sees it: admission (queue limit), decoding, and the forward pass over a batch
    of jobs (`leave_queue`, then `forward`).  `submit` is the subclass's way of grouping jobs into batches
    (EngineWorker: a thread here; vitnp.ray: Ray Serve's @serve.batch); both run batches through `forward`."""

    def __init__(self, name: str, classifier, options: ServingOptions, aliases: tuple[str, ...] = ()):
        self.name = name
        self.classifier = classifier
        self.options = options
        self.aliases = aliases
        self.cache_identity = (name, classifier.revision)
        self.metrics = Metrics()  # the service's, once the registry serves this worker
        self.busy_since: float | None = None  # when the forward pass under way started
        # Images admitted but not yet in a forward pass (being decoded, or waiting for their batch).
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        c = classifier.config
        # The pixels of one batch; only the one thread that runs this worker's forward passes writes it.
        self._batch = np.empty((options.max_batch_size, c.num_channels, c.image_size, c.image_size), np.float32)

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
            "precision": self.classifier.precision,
            "backend": self.classifier.backend,
            "architecture": c.architecture,
            "num_labels": c.num_labels,
            "image_size": c.image_size,
            "max_batch_size": self.options.max_batch_size,
            "queued": self._waiting,
            "status": "loaded",
        }

    def answering(self) -> bool:
        """The worker takes jobs and no forward pass has been running for ENGINE_STALL_S."""
        busy_since = self.busy_since
        return busy_since is None or time.monotonic() - busy_since < ENGINE_STALL_S

    def admit(self, images: int = 1) -> None:
        """Admit a request's images together against max_queue (QueueFullError if they do not all fit)."""
        if images > self.options.max_queue:
            raise ParameterError(f"a request of {images} images is more than model {self.name} queues at once "
                                 f"({self.options.max_queue}): send fewer images per request")
        with self._waiting_lock:
            if self._waiting + images > self.options.max_queue:
                self.metrics.rejected(self.name, "queue_full")
                raise QueueFullError(f"Model {self.name} is overloaded: {self._waiting} images are queued; "
                                     "retry later")
            self._waiting += images
            self.metrics.queue_size(self.name, self._waiting)

    def withdraw(self, images: int = 1) -> None:
        """Admitted images that will not reach the engine (a failed decode, a request past its deadline)."""
        self.leave_queue(images)

    def take(self, jobs: list[Job]) -> list[str]:
        """Jobs leave the queue for a forward pass: each one's Job.start state ("run", "expired", "gone")."""
        now = time.monotonic()
        states = [job.start(now) for job in jobs]
        for job, state in zip(jobs, states):
            if state == "run":
                self.metrics.queued(self.name, now - job.admitted)
        self.leave_queue(sum(state != "gone" for state in states))
        return states

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> (1, 3, H, W) pixel values, the image's size checked against max_image_pixels before it
        is decoded. Runs on the decode thread pool, never on the worker."""
        from .preprocess import image_pixels

        limit = {} if self.options.max_image_pixels is None else {"max_pixels": self.options.max_image_pixels}
        return image_pixels(data, self.classifier.processor, **limit)[None]

    def leave_queue(self, n: int) -> None:
        """n admitted images go into a forward pass: they no longer count against the queue limit."""
        if n == 0:
            return
        with self._waiting_lock:
            self._waiting -= n
            self.metrics.queue_size(self.name, self._waiting)

    def forward(self, jobs: list[Job]) -> list:
        """One forward pass over up to max_batch_size jobs -> each job's predictions, or its NonFiniteScoresError.
        Called from one thread per worker at a time; forward passes of all models take turns (FORWARD_LOCK)."""
        n = len(jobs)
        for i, job in enumerate(jobs):
            self._batch[i] = job.pixels[0]
        with FORWARD_LOCK:
            t0 = self.busy_since = time.monotonic()
            try:
                logits = self.classifier.logits(self._batch[:n])
            finally:
                self.busy_since = None
        self.metrics.forward_pass(self.name, n, time.monotonic() - t0)
        results = []
        for i, job in enumerate(jobs):  # a job's result: its predictions, or the error that is its alone
            try:
                with np.errstate(all="ignore"):  # an overflow's non-finite score is that job's error
                    predictions = self.classifier.postprocess(logits[i:i + 1], job.top_k, job.function_to_apply)[0]
                results.append(check_finite(predictions))
            except NonFiniteScoresError as e:
                results.append(e)
        return results

    def submit(self, job: Job):
        """A future (concurrent or asyncio) of (predictions, batch size) for one admitted, decoded image."""
        raise NotImplementedError

    def close(self, timeout: float | None = None) -> None:
        raise NotImplementedError


def deadline_error(model: str) -> DeadlineExceededError:
    return DeadlineExceededError(f"Model {model}: the request was still queued at its deadline (--request-timeout) "
                                 "and was dropped; retry later")


class EngineWorker(ModelWorker):
    """One model and the one thread that runs its forward passes."""

    def __init__(self, name: str, classifier, options: ServingOptions, aliases: tuple[str, ...] = ()):
        super().__init__(name, classifier, options, aliases)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (Job, Future), or _STOP
        self._thread = threading.Thread(target=self._run, name=f"vitnp-engine[{name}]", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future

    def answering(self) -> bool:
        return self._thread.is_alive() and super().answering()

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

    def _collect(self, first: tuple) -> tuple[list[tuple], bool]:
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
            elif self.waiting > len(batch) and now < grace_deadline:
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

    def _run_batch(self, batch: list[tuple]) -> None:
        states = self.take([job for job, _ in batch])
        for (_, future), state in zip(batch, states):
            if state == "expired":
                future.set_exception(deadline_error(self.name))
        batch = [item for item, state in zip(batch, states) if state == "run"]
        n = len(batch)
        if not n:
            return
        try:
            predictions = self.forward([job for job, _ in batch])
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("forward pass failed for model %s (batch of %d; requests %s)", self.name, n,
                          ", ".join(str(job.request_id) for job, _ in batch))
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, predictions):
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result((result, n))


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
    """The one object the HTTP layer talks to: classify, models, readiness, info, metrics."""

    def __init__(self, registry, options: ServingOptions, metrics: Metrics | None = None):
        """registry: a vitnp.registry.ModelRegistry (model name -> ModelWorker); metrics: this process's
        (default: a new prometheus_client one; Ray replicas pass a metrics.RayMetrics)."""
        self.registry = registry
        self.options = options
        self.metrics = metrics if metrics is not None else Metrics()
        registry.use_metrics(self.metrics)
        self.cache = ResultCache(options.cache_size)
        self.draining = False
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(options.decode_threads,
                                                                  thread_name_prefix="vitnp-decode")

    def deadline(self) -> float | None:
        """The time.monotonic() deadline of a request arriving now (ServingOptions.request_timeout)."""
        timeout = self.options.request_timeout
        return None if timeout is None else time.monotonic() + timeout

    async def classify(self, model: str | None, images: list[bytes], top_k=None, function_to_apply=None,
                       use_cache: bool = True, wait_for_model: bool | None = None,
                       deadline: float | None = None) -> list[Classification]:
        """Predictions for each image of one request (a single-image request is a list of one).

        wait_for_model: None or True wait up to load_timeout for a model that is loading, False answers
        ModelLoadingError at once. deadline: a time.monotonic() value; images still queued then are dropped
        (DeadlineExceededError). The images are admitted against the queue limit together (QueueFullError if
        they do not all fit); each is one image of a batch. Raises vitnp errors (ImageError, ParameterError,
        ModelNotFoundError, QueueFullError, ModelLoadingError, DeadlineExceededError, ...)."""
        if not images:
            raise ParameterError("the request holds no image")
        worker = await self.registry.get(model, wait_for_model, deadline)
        t0 = time.perf_counter()
        top_k, function_to_apply = validate_parameters(top_k, function_to_apply, worker.num_labels)
        loop = asyncio.get_running_loop()
        if sum(map(len, images)) > HASH_OFF_LOOP_BYTES:
            digests = await loop.run_in_executor(self._decode_pool, run_with_context(_digests, images))
        else:
            digests = _digests(images)
        keys = [(worker.cache_identity, digest, top_k, function_to_apply) for digest in digests]
        found = [self.cache.get(key) if use_cache else None for key in keys]
        misses = [i for i, predictions in enumerate(found) if predictions is None]
        if use_cache:
            self.metrics.cache_lookup(worker.name, len(images) - len(misses), len(misses))
        batch_sizes = [0] * len(images)
        if misses:
            computed = await self._compute(worker, [images[i] for i in misses], top_k, function_to_apply, deadline)
            for i, (predictions, batch_size) in zip(misses, computed):
                found[i] = predictions
                batch_sizes[i] = batch_size
                self.cache.put(keys[i], predictions)
        seconds = time.perf_counter() - t0
        missed = set(misses)
        return [Classification(predictions, worker.name, i not in missed, batch_sizes[i], seconds)
                for i, predictions in enumerate(found)]

    async def _compute(self, worker, images: list[bytes], top_k: int, function_to_apply: str | None,
                       deadline: float | None) -> list[tuple[list[dict], int]]:
        """Admit, decode and run images through the worker -> (predictions, batch size) per image."""
        loop = asyncio.get_running_loop()
        n = len(images)
        worker.admit(n)
        admitted = time.monotonic()
        decoded = await asyncio.gather(*[
            loop.run_in_executor(self._decode_pool, run_with_context(worker.decode, image))
            for image in images], return_exceptions=True)
        for i, result in enumerate(decoded):
            if isinstance(result, BaseException):
                worker.withdraw(n)
                if isinstance(result, ImageError) and n > 1:
                    raise ImageError(f"inputs[{i}]: {result}") from None
                raise result
        jobs = [Job(pixels, top_k, function_to_apply, deadline, admitted) for pixels in decoded]
        futures = []
        for job in jobs:
            future = worker.submit(job)
            futures.append(asyncio.wrap_future(future) if isinstance(future, concurrent.futures.Future) else future)
        # return_exceptions: no answer of this request is left unretrieved, whatever happens to the others.
        results = asyncio.gather(*futures, return_exceptions=True)
        if deadline is not None:
            try:
                results = await asyncio.wait_for(asyncio.shield(results), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                dropped = sum(job.give_up() for job in jobs)
                if dropped:
                    worker.withdraw(dropped)
                    self.metrics.rejected(worker.name, "deadline")
                    raise deadline_error(worker.name) from None
                results = await results
        else:
            results = await results
        for result in results:
            if isinstance(result, DeadlineExceededError):
                self.metrics.rejected(worker.name, "deadline")
            if isinstance(result, BaseException):
                raise result
        return results

    def models(self) -> list[dict]:
        return self.registry.models()

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready when every startup model is loaded and every engine worker answers, and the
        server is not draining."""
        if self.draining:
            return False, "draining: the server is shutting down"
        return self.registry.readiness()

    def drain(self) -> None:
        """The server is shutting down: readiness says so from now on (requests in flight still finish)."""
        self.draining = True

    def info(self) -> dict:
        """What the server runs, JSON-ready (GET /info): the models, the engine, the batching and limit
        settings, the vitnp version."""
        from . import __version__

        o = self.options
        default = self.registry.default
        return {
            "model_id": default,
            "models": self.registry.models(),
            "engine": self.registry.engine_info(),
            "batching": {"max_batch_size": o.max_batch_size, "max_wait_ms": o.max_wait_ms,
                         "max_queue": o.max_queue, "decode_threads": o.decode_threads,
                         "cache_size": o.cache_size},
            "limits": {"max_body_mb": o.max_body_mb, "max_image_pixels": o.max_image_pixels,
                       "body_timeout": o.body_timeout, "load_timeout": o.load_timeout,
                       "request_timeout": o.request_timeout, "graceful_timeout": o.graceful_timeout},
            "load_on_demand": self.registry.on_demand is not None,
            "version": __version__,
        }

    def close(self) -> None:
        self.registry.close()
        self._decode_pool.shutdown(wait=True)


def _digests(images: list[bytes]) -> list[bytes]:
    return [_digest(image) for image in images]


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
