"""The models a server answers for, by name: the ones named on the command line, plus Hub ids / bundled
models loaded on a request's demand (503 + estimated_time while they load).

A name from a URL is only ever looked up as an alias of a loaded model, a bundled:<name>, or a Hub id
resolved through huggingface_hub's cache: never as a filesystem path (vitnp.hub checks it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from .batching import EngineWorker, ModelWorker
from .errors import ModelLoadingError, ModelNotFoundError, ModelUnavailableError, VitnpError
from .hub import check_not_a_path, check_url_model_exists, check_url_name
from .options import EngineOptions, ServingOptions
from .startup import NamedModel, load_classifier, start_worker

log = logging.getLogger("vitnp.server")

# Before any load has been timed, tell clients to retry after this many seconds.
DEFAULT_LOAD_ESTIMATE_S = 10.0
# A failed on-demand load is answered from memory for this long instead of being retried.
FAILED_LOAD_MEMORY_S = 60.0


@dataclass
class Loading:
    """An on-demand load under way."""

    started: float
    future: asyncio.Future


class ModelRegistry:
    """Name -> ModelWorker. Startup models are added before the port opens (`load` + `add`); with
    load_on_demand, `get` has a URL's model loaded in the background (OnDemandLoader)."""

    def __init__(self, serving: ServingOptions, engine: EngineOptions | None = None, load_on_demand: bool = False,
                 revision: str | None = None):
        """engine: how `load` loads models (default: EngineOptions())."""
        self.serving = serving
        self.engine = engine if engine is not None else EngineOptions()
        self.revision = revision
        self.on_demand = OnDemandLoader(self) if load_on_demand else None
        self.default: str | None = None
        self.load_seconds: list[float] = []           # how long each load took (load + warm-up)
        self.closed = False
        self._workers: dict[str, ModelWorker] = {}    # canonical name -> worker
        self._names: dict[str, str] = {}              # canonical name or alias -> canonical name

    def load(self, model: NamedModel) -> EngineWorker:
        """Load, warm up and start a model on an engine thread (not yet added); raises VitnpError."""
        t0 = time.perf_counter()
        classifier = load_classifier(model.spec, self.engine, revision=self.revision, progress=False)
        worker = start_worker(EngineWorker, model.name, model.aliases, classifier, self.serving)
        self.load_seconds.append(time.perf_counter() - t0)
        return worker

    def add(self, worker: ModelWorker) -> None:
        """Serve a started worker under its name and aliases (startup.name_models gave the startup models
        distinct names; an on-demand model is named by a URL no model answers to); the first one added is
        the default for POST /."""
        self._workers[worker.name] = worker
        for n in (worker.name, *worker.aliases):
            self._names[n] = worker.name
        if self.default is None:
            self.default = worker.name

    def models(self) -> list[dict]:
        out = []
        for name, worker in self._workers.items():
            entry = worker.info()
            entry["default"] = name == self.default
            out.append(entry)
        return out + (self.on_demand.models() if self.on_demand is not None else [])

    def lookup(self, name: str) -> ModelWorker | None:
        canonical = self._names.get(name)
        return self._workers.get(canonical) if canonical is not None else None

    async def get(self, name: str | None, wait_for_model: bool = False) -> ModelWorker:
        """The worker for a model name from a request; may start an on-demand load (ModelLoadingError)."""
        if name is None:
            if self.default is None:
                raise ModelNotFoundError("this server has no default model: POST to /models/<model id>")
            name = self.default
        worker = self.lookup(name)
        if worker is not None:
            return worker
        loading = self.on_demand.loading.get(name) if self.on_demand is not None else None
        if loading is None:
            check_url_name(name)
            if self.on_demand is None or self.closed:
                raise ModelNotFoundError(f"Model {name} is not loaded on this server")
            found = await self.on_demand.start(name)
            if isinstance(found, ModelWorker):  # another request finished loading it meanwhile
                return found
            loading = found
        if not wait_for_model:
            raise ModelLoadingError(name, self.on_demand.estimated_time(loading))
        return await asyncio.shield(loading.future)

    def close(self) -> None:
        """Stop every worker after it has finished its queued jobs."""
        self.closed = True
        for worker in self._workers.values():
            worker.close()


class OnDemandLoader:
    """Loads the models that URLs name, in the background, into a registry: one load per name at a time,
    clients told how long to wait (the slowest load so far), a failure remembered for FAILED_LOAD_MEMORY_S."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.loading: dict[str, Loading] = {}
        self._failed: dict[str, tuple[float, VitnpError]] = {}

    def models(self) -> list[dict]:
        return [{"model_id": name, "status": "loading", "estimated_time": self.estimated_time(loading)}
                for name, loading in self.loading.items()]

    def estimated_time(self, loading: Loading) -> float:
        seconds = self.registry.load_seconds
        expected = max(seconds) if seconds else DEFAULT_LOAD_ESTIMATE_S
        return round(max(1.0, expected - (time.monotonic() - loading.started)), 1)

    async def start(self, name: str) -> Loading | ModelWorker:
        """The load of a valid URL model name, started unless one is under way; or its worker, if a load
        finished meanwhile. Raises ModelNotFoundError (or a recent failure) instead of promising a model that
        is not there."""
        failed = self._failed.get(name)
        if failed is not None:
            when, error = failed
            if time.monotonic() - when < FAILED_LOAD_MEMORY_S:
                raise error
            del self._failed[name]
        await asyncio.get_running_loop().run_in_executor(None, check_url_model_exists, name,
                                                         self.registry.revision)
        worker = self.registry.lookup(name)
        if worker is not None:
            return worker
        loading = self.loading.get(name)
        if loading is None:
            loop = asyncio.get_running_loop()
            loading = self.loading[name] = Loading(time.monotonic(), loop.create_future())
            threading.Thread(target=self._load, args=(name, loop, loading.future), name=f"vitnp-load[{name}]",
                             daemon=True).start()
            log.info("loading model %s on demand", name)
        return loading

    def _load(self, name: str, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        t0 = time.perf_counter()
        try:
            check_not_a_path(name)
            worker = self.registry.load(NamedModel(name, (), name))
        except Exception as e:  # noqa: BLE001 - reported to the waiting requests, logged here
            loop.call_soon_threadsafe(self._finish, name, future, None, load_failure(name, e))
            return
        log.info("model %s loaded on demand in %.1fs", name, time.perf_counter() - t0)
        loop.call_soon_threadsafe(self._finish, name, future, worker, None)

    def _finish(self, name: str, future: asyncio.Future, worker: ModelWorker | None,
                error: BaseException | None) -> None:
        self.loading.pop(name, None)
        if worker is not None:
            if self.registry.closed:
                worker.close()
            else:
                self.registry.add(worker)
            future.set_result(worker)
            return
        if isinstance(error, VitnpError):
            self._failed[name] = (time.monotonic(), error)
        future.set_exception(error)
        # Nobody may be waiting for this load; mark the exception as seen so asyncio does not log it.
        future.exception()


def load_failure(name: str, e: Exception) -> BaseException:
    """What the requests waiting for a failed on-demand load hear (the details go to the log only)."""
    if isinstance(e, (ModelNotFoundError, ConnectionError)):
        log.warning("on-demand load of %s failed: %s", name, e)
        return ModelNotFoundError(f"Model {name} does not exist or is not available on this server")
    if isinstance(e, VitnpError):
        log.warning("on-demand load of %s failed: %s", name, e)
        return ModelUnavailableError(f"Model {name} cannot be served: it is not a supported ViT/DeiT "
                                     "image-classification checkpoint")
    log.exception("on-demand load of %s failed", name, exc_info=e)
    return e
