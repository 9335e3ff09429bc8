"""Dynamic batching between the HTTP layer and the engine: one worker per model, and a bounded LRU cache of
results (the models by name: vitnp.registry).

This layer never sees HTTP: it takes image bytes plus raw parameter values and returns plain lists of
{"label", "score"} dicts, or raises vitnp errors (ImageError, ParameterError, ModelNotFoundError,
QueueFullError, ModelLoadingError, ...) for the HTTP layer to map to statuses.

Per request: look up the model in the registry (loading it on demand if allowed), validate the parameters,
consult the result cache, take a queue slot, decode + preprocess the image on a thread pool (so one bad image fails
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
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from .errors import QueueFullError
from .options import ServingOptions
from .postprocess import validate_parameters

log = logging.getLogger("vitnp.server")

# Bodies above this size are hashed on the thread pool instead of the event loop.
HASH_OFF_LOOP_BYTES = 1 << 20
# How long a batch may wait past max_wait for admitted requests that are still being decoded, and how
# often it looks whether they have arrived (a failed decode withdraws its request without a signal).
DECODE_GRACE_S = 0.1
GRACE_POLL_S = 0.002


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


@dataclass(frozen=True)
class Job:
    """One admitted, decoded image and its parameters, waiting for a forward pass."""

    pixels: np.ndarray  # (1, 3, H, W) float32
    top_k: int
    function_to_apply: str | None


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
        # Requests admitted but not yet in a forward pass (being decoded, or waiting for their batch).
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
        """Image bytes -> (1, 3, H, W) pixel values, the image's size checked against max_image_pixels before it
        is decoded. Runs on the decode thread pool, never on the worker."""
        from .preprocess import image_pixels

        limit = {} if self.options.max_image_pixels is None else {"max_pixels": self.options.max_image_pixels}
        return image_pixels(data, self.classifier.processor, **limit)[None]

    def leave_queue(self, n: int) -> None:
        """n admitted requests go into a forward pass: they no longer count against the queue limit."""
        with self._waiting_lock:
            self._waiting -= n

    def forward(self, jobs: list[Job]) -> list[list[dict]]:
        """One forward pass over up to max_batch_size jobs -> each job's predictions. Called from one thread
        per worker at a time; forward passes of all models take turns (FORWARD_LOCK)."""
        n = len(jobs)
        for i, job in enumerate(jobs):
            self._batch[i] = job.pixels[0]
        with FORWARD_LOCK:
            logits = self.classifier.logits(self._batch[:n])
        return [self.classifier.postprocess(logits[i:i + 1], job.top_k, job.function_to_apply)[0]
                for i, job in enumerate(jobs)]

    def submit(self, job: Job):
        """A future (concurrent or asyncio) of (predictions, batch size) for one admitted, decoded image."""
        raise NotImplementedError

    def close(self, timeout: float | None = None) -> None:
        raise NotImplementedError


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
        n = len(batch)
        self.leave_queue(n)
        try:
            predictions = self.forward([job for job, _ in batch])
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("forward pass failed for model %s (batch of %d)", self.name, n)
            for _, future in batch:
                future.set_exception(e)
            return
        for (_, future), result in zip(batch, predictions):
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
    """The one object the HTTP layer talks to."""

    def __init__(self, registry, options: ServingOptions):
        """registry: a vitnp.registry.ModelRegistry (model name -> ModelWorker)."""
        self.registry = registry
        self.cache = ResultCache(options.cache_size)
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(options.decode_threads,
                                                                  thread_name_prefix="vitnp-decode")

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
        predictions, batch_size = await asyncio.wrap_future(worker.submit(Job(pixels, top_k, function_to_apply)))
        self.cache.put(key, predictions)
        return Classification(predictions, worker.name, False, batch_size, time.perf_counter() - t0)

    def models(self) -> list[dict]:
        return self.registry.models()

    def close(self) -> None:
        self.registry.close()
        self._decode_pool.shutdown(wait=True)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
