"""The models a server answers for, by name: the ones named on the command line, plus Hub ids / bundled
models loaded on a request's demand (503 + estimated_time while they load).

A name from a URL is only ever looked up as an alias of a loaded model, a bundled:<name>, or a Hub id
resolved through huggingface_hub's cache: never as a filesystem path (vitnp.hub checks it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass

from .batching import EngineWorker, ModelWorker
from .errors import (
    CheckpointError,
    HubUnreachableError,
    ModelLoadFailedError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnavailableError,
    OfflineError,
    QueueFullError,
    VitnpError,
)
from .hub import BUNDLED_PREFIX, check_not_a_path, check_url_name, lookup_url_model, url_revision
from .logs import run_with_context
from .metrics import Metrics
from .options import EngineOptions, ServingOptions
from .startup import NamedModel, load_classifier, start_worker

log = logging.getLogger("vitnp.server")

# Before any load has been timed, tell clients to retry after this many seconds.
DEFAULT_LOAD_ESTIMATE_S = 10.0
# Hub lookups (network waits) and model loads (CPU) run on their own bounded pools, never on the event loop's
# default executor: no number of them delays requests for models that are ready.
LOOKUP_THREADS = 4
LOAD_THREADS = 1
# Distinct on-demand names being looked up or loaded at once; past it, 429.
MAX_PENDING_MODELS = 32
# Failures remembered at once (the oldest is forgotten first): random names cannot grow memory without bound.
MAX_REMEMBERED_FAILURES = 4096


@dataclass
class Loading:
    """A model load under way (a startup model, or one loaded on demand)."""

    started: float
    future: asyncio.Future


class ModelRegistry:
    """Name -> ModelWorker. Startup models are loaded (`load` + `add`, or `start` in the background while the
    port is open); with load_on_demand, `get` has a URL's model looked up and loaded in the background
    (OnDemandLoader)."""

    def __init__(self, serving: ServingOptions, engine: EngineOptions | None = None, load_on_demand: bool = False,
                 revision: str | None = None):
        """engine: how `load` loads models (default: EngineOptions())."""
        self.serving = serving
        self.engine = engine if engine is not None else EngineOptions()
        self.revision = revision
        self.metrics = Metrics()  # the service's, once it is made (use_metrics)
        self.default: str | None = None
        self.load_seconds: list[float] = []           # how long each load took (load + warm-up)
        self.loading: dict[str, Loading] = {}         # canonical name -> load under way
        self.startup: list[str] = []                  # canonical names of the startup models
        self.closed = False
        self._workers: dict[str, ModelWorker] = {}    # canonical name -> worker
        self._names: dict[str, str] = {}              # canonical name or alias -> canonical name
        self._load_pool = concurrent.futures.ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="vitnp-load")
        self.on_demand = OnDemandLoader(self) if load_on_demand else None

    def use_metrics(self, metrics: Metrics) -> None:
        self.metrics = metrics
        for worker in self._workers.values():
            worker.metrics = metrics

    def load(self, model: NamedModel, **load_kwargs) -> EngineWorker:
        """Load, warm up and start a model on an engine thread (not yet added); raises VitnpError.
        load_kwargs go to vitnp.load (local_files_only)."""
        t0 = time.perf_counter()
        try:
            classifier = load_classifier(model.spec, self.engine, revision=self.revision, progress=False,
                                         **load_kwargs)
            worker = start_worker(EngineWorker, model.name, model.aliases, classifier, self.serving)
        except BaseException:
            self.metrics.model_load_failed(model.name)
            raise
        seconds = time.perf_counter() - t0
        self.load_seconds.append(seconds)
        self.metrics.model_loaded(model.name, seconds)
        return worker

    def add(self, worker: ModelWorker) -> None:
        """Serve a started worker under its name and aliases (startup.name_models gave the startup models
        distinct names; an on-demand model is named by a URL no model answers to); the first one added is
        the default for POST /."""
        worker.metrics = self.metrics
        self._workers[worker.name] = worker
        for n in (worker.name, *worker.aliases):
            self._names[n] = worker.name
        if self.default is None:
            self.default = worker.name

    def start(self, models: list[NamedModel]) -> asyncio.Future:
        """Load the startup models in the background, in order, from the running event loop: requests for
        them wait (or get 503) as for an on-demand load, and readiness says which is loading. The future
        resolves when all are served, or raises the first load's error."""
        loop = asyncio.get_running_loop()
        for model in models:
            self.startup.append(model.name)
            for n in (model.name, *model.aliases):
                self._names.setdefault(n, model.name)
            if self.default is None:
                self.default = model.name
            self.loading[model.name] = Loading(time.monotonic(), loop.create_future())

        async def load_all():
            for model in models:
                loading = self.loading[model.name]
                try:
                    worker = await loop.run_in_executor(self._load_pool, run_with_context(self.load, model))
                except BaseException as e:
                    for other in models:
                        pending = self.loading.pop(other.name, None)
                        if pending is not None and not pending.future.done():
                            pending.future.set_exception(e)
                            pending.future.exception()
                    raise
                log.info("model %s ready (%s) in %.1fs", model.spec, ", ".join((model.name, *model.aliases)),
                         time.monotonic() - loading.started)
                self.finish_load(model.name, loading.future, worker, None)

        return asyncio.ensure_future(load_all())

    def finish_load(self, name: str, future: asyncio.Future, worker: ModelWorker | None,
                    error: BaseException | None) -> None:
        """A load is over (event-loop thread): serve its worker, or tell the waiting requests why not."""
        self.loading.pop(name, None)
        if worker is not None:
            if self.closed:
                worker.close()
            else:
                self.add(worker)
            future.set_result(worker)
            return
        future.set_exception(error)
        # Nobody may be waiting for this load; mark the exception as seen so asyncio does not log it.
        future.exception()

    def models(self) -> list[dict]:
        out = []
        for name, worker in self._workers.items():
            entry = worker.info()
            entry["default"] = name == self.default
            out.append(entry)
        return out + [{"model_id": name, "status": "loading", "default": name == self.default,
                       "estimated_time": self.estimated_time(loading)} for name, loading in self.loading.items()]

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): every startup model served and every engine worker answering."""
        for name in self.startup:
            if name not in self._workers:
                return False, f"loading model {name}"
        for name, worker in self._workers.items():
            if not worker.answering():
                return False, f"the engine of model {name} is not answering"
        if self.closed:
            return False, "draining: the server is shutting down"
        return True, "ready"

    def engine_info(self) -> dict:
        """The engine the models run on: backend, precision and threads as configured, and the kernels' ISA."""
        from .kernels import isa

        e = self.engine
        return {"backend": e.backend, "precision": e.precision, "threads": e.threads, "isa": isa.ISA}

    def lookup(self, name: str) -> ModelWorker | None:
        canonical = self._names.get(name)
        return self._workers.get(canonical) if canonical is not None else None

    def estimated_time(self, loading: Loading) -> float:
        """Seconds until a load under way should be done: the slowest load so far, less its elapsed time."""
        seconds = self.load_seconds
        expected = max(seconds) if seconds else DEFAULT_LOAD_ESTIMATE_S
        return round(max(1.0, expected - (time.monotonic() - loading.started)), 1)

    async def get(self, name: str | None, wait_for_model: bool | None = None,
                  deadline: float | None = None) -> ModelWorker:
        """The worker for a model name from a request; a model that is loading (a startup model, or one this
        may start loading on demand) is waited for up to load_timeout (and the deadline), unless
        wait_for_model is False: then, or past the wait, ModelLoadingError."""
        if name is None:
            if self.default is None:
                raise ModelNotFoundError("this server has no default model: POST to /models/<model id>")
            name = self.default
        worker = self.lookup(name)
        if worker is not None:
            return worker
        canonical = self._names.get(name, name)
        loading = self.loading.get(canonical)
        if loading is None:
            check_url_name(name)
            if self.on_demand is None or self.closed:
                raise ModelNotFoundError(f"Model {name} is not loaded on this server")
            found = await self.on_demand.start(name)
            if isinstance(found, ModelWorker):  # another request finished loading it meanwhile
                return found
            loading = found
        if wait_for_model is not False:
            timeout = self.serving.load_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
            if timeout > 0:
                try:
                    return await asyncio.wait_for(asyncio.shield(loading.future), timeout)
                except asyncio.TimeoutError:
                    pass
        self.metrics.rejected(canonical, "loading")
        raise ModelLoadingError(canonical, self.estimated_time(loading))

    def close(self) -> None:
        """Stop every worker after it has finished its queued jobs."""
        self.closed = True
        for worker in self._workers.values():
            worker.close()
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        if self.on_demand is not None:
            self.on_demand.close()


class OnDemandLoader:
    """Looks up and loads the models that URLs name, in the background, into a registry: one lookup and one
    load per name at a time, on bounded pools (LOOKUP_THREADS, the registry's load pool), clients told how
    long to wait (the slowest load so far); every failure (an unknown model, an unreachable Hub, a broken
    checkpoint, an unexpected exception) is remembered for ServingOptions.failure_memory seconds and answered
    from memory meanwhile."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self._lookup_pool = concurrent.futures.ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="vitnp-lookup")
        self._lookups: dict[str, asyncio.Future] = {}             # name -> lookup under way (True: cached)
        self._failed: dict[str, tuple[float, BaseException]] = {}  # name -> (when, what requests hear)

    def recent_failure(self, name: str) -> BaseException | None:
        failed = self._failed.get(name)
        if failed is None:
            return None
        when, error = failed
        if time.monotonic() - when < self.registry.serving.failure_memory:
            return error
        del self._failed[name]
        return None

    def remember(self, name: str, error: BaseException) -> None:
        self._failed.pop(name, None)
        while len(self._failed) >= MAX_REMEMBERED_FAILURES:
            del self._failed[next(iter(self._failed))]
        self._failed[name] = (time.monotonic(), error)

    async def start(self, name: str) -> Loading | ModelWorker:
        """The load of a valid URL model name, started unless one is under way; or its worker, if a load
        finished meanwhile. Raises the lookup's error (or a recent failure's) instead of promising a model
        that is not there."""
        error = self.recent_failure(name)
        if error is not None:
            raise error
        cached = await self.lookup(name)
        worker = self.registry.lookup(name)
        if worker is not None:
            return worker
        loading = self.registry.loading.get(name)
        if loading is None:
            error = self.recent_failure(name)  # a load that failed while this request waited for its lookup
            if error is not None:
                raise error
            loop = asyncio.get_running_loop()
            loading = self.registry.loading[name] = Loading(time.monotonic(), loop.create_future())
            log.info("loading model %s on demand", name)
            asyncio.ensure_future(self._load(name, loading, cached))
        return loading

    async def lookup(self, name: str) -> bool:
        """lookup_url_model on the lookup pool, one per name at a time, within hub_timeout; failures are
        remembered."""
        future = self._lookups.get(name)
        if future is None:
            pending = len(self._lookups) + len(self.registry.loading)
            if pending >= MAX_PENDING_MODELS:
                raise QueueFullError(f"{pending} models are being looked up or loaded; retry later",
                                     retry_after=self.registry.serving.hub_timeout)
            future = self._lookups[name] = asyncio.ensure_future(self._lookup(name))
        return await asyncio.shield(future)

    async def _lookup(self, name: str) -> bool:
        serving = self.registry.serving
        loop = asyncio.get_running_loop()
        try:
            try:
                return await asyncio.wait_for(loop.run_in_executor(self._lookup_pool, run_with_context(
                    lookup_url_model, name, url_revision(name, self.registry.revision), serving.hub_timeout)),
                    serving.hub_timeout + 1.0)
            except asyncio.TimeoutError:
                raise HubUnreachableError(f"Model {name} could not be looked up on the Hugging Face Hub within "
                                          f"{serving.hub_timeout:g} seconds") from None
        except VitnpError as e:
            if hasattr(e, "retry_after"):
                e.retry_after = max(1.0, serving.failure_memory)
            self.remember(name, e)
            log.warning("model %s: %s", name, e)
            raise
        finally:
            self._lookups.pop(name, None)

    async def _load(self, name: str, loading: Loading, cached: bool) -> None:
        registry = self.registry
        loop = asyncio.get_running_loop()
        kwargs = {"local_files_only": True} if cached and not name.startswith(BUNDLED_PREFIX) else {}

        def load():
            check_not_a_path(name)
            return registry.load(NamedModel(name, (), name), **kwargs)

        try:
            worker = await loop.run_in_executor(registry._load_pool, run_with_context(load))
        except Exception as e:  # noqa: BLE001 - reported to the waiting requests, remembered, logged
            error = load_failure(name, e)
            self.remember(name, error)
            registry.finish_load(name, loading.future, None, error)
            return
        log.info("model %s loaded on demand in %.1fs", name, time.monotonic() - loading.started)
        registry.finish_load(name, loading.future, worker, None)

    def close(self) -> None:
        self._lookup_pool.shutdown(wait=False, cancel_futures=True)


def load_failure(name: str, e: Exception) -> VitnpError:
    """What the requests waiting for a failed on-demand load hear (the details go to the log only)."""
    if isinstance(e, (ModelNotFoundError, OfflineError)):
        log.warning("on-demand load of %s failed: %s", name, e)
        return ModelNotFoundError(f"Model {name} is not available on this server: {e}")
    if isinstance(e, CheckpointError):
        log.warning("on-demand load of %s failed: %s", name, e)
        return ModelUnavailableError(f"Model {name} cannot be served: its checkpoint is malformed ({e})")
    if isinstance(e, VitnpError):
        log.warning("on-demand load of %s failed: %s", name, e)
        return ModelUnavailableError(f"Model {name} cannot be served: it is not a supported ViT/DeiT "
                                     f"image-classification checkpoint ({e})")
    log.error("on-demand load of %s failed", name, exc_info=e)
    return ModelLoadFailedError(f"Model {name} failed to load (the details are in the server log); it will not "
                                "be tried again for a while")
