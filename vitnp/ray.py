"""Scale-out on Ray: batch inference with Ray Data and HTTP serving with Ray Serve, on vitnp's engine.

    pip install 'vitnp[ray]'

    import ray, vitnp.ray
    model = vitnp.ray.share("google/vit-base-patch16-224")      # loaded once, weights put in the object store
    ds = ray.data.read_binary_files("images/", include_paths=True)
    ds = ds.map_batches(vitnp.ray.ImageClassifier, fn_constructor_kwargs={"model": model, "top_k": 5},
                        compute=ray.data.ActorPoolStrategy(size=4), batch_size=16, num_cpus=1)
    ds.write_parquet("predictions/")          # columns: path, label, score, predictions, error

Ray does the scheduling, retries and scaling; vitnp brings the engine. Ray is imported only when these
functions are used; without it they raise RayNotInstalledError naming the extra.

Weights are shared, not copied: `share` loads a checkpoint once on the driver, with a final weight layout
(backend "numba" or "blas"), and puts the ViTWeights into Ray's object store. Every actor or Serve replica
rebuilds its Classifier around `ray.get` of that object, whose numpy arrays are zero-copy, read-only views
on the node's shared-memory object store: N processes on a node map one copy (Ray moves it once per node).

Ray Serve: `serve_application(...)` builds a deployment whose replicas start their models the way
`vitnp serve` does (vitnp.startup) and run exactly vitnp.server's Starlette application (same routes,
parsing, errors, headers: `create_app`), over vitnp.batching's InferenceService; only the way a worker groups
requests into forward passes differs: `@serve.batch` instead of a thread, calling the same
`ModelWorker.forward`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ImageError, ParameterError, VitnpError
from .postprocess import DEFAULT_TOP_K, validate_parameters
from .files import find_images, no_images_message
from .options import ClassifyOptions, EngineOptions, ServerOptions, ServingOptions
from .startup import NamedModel, classifier_with_weights, load_classifier, name_models

log = logging.getLogger("vitnp.ray")

EXTRA = "pip install 'vitnp[ray]'"
# The backends whose weight layout never changes after loading ("auto" re-lays weights out per process on its
# first timed decision, which would turn the shared read-only copy into a private one).
SHARED_BACKENDS = ("numba", "blas")
# Ray Serve replicas take at least this many requests at once (more with a longer queue).
MIN_ONGOING_REQUESTS = 16
OUTPUT_COLUMNS = ("label", "score", "predictions", "error")
# Where a batch's images come from, in order of preference: the images themselves, else files to read.
IMAGE_COLUMNS = ("bytes", "image", "path")
# A block of the CLI job holds whole batches: one each up to TARGET_BLOCKS blocks (fine-grained spreading over
# the actors), more on bigger jobs to bound Ray's per-block bookkeeping, never so many that a retried block
# (after an actor died) redoes much.
TARGET_BLOCKS = 1000
MAX_BATCHES_PER_BLOCK = 64


class RayNotInstalledError(VitnpError, ImportError):
    """The Ray features were used without Ray installed."""


def require_ray():
    """The ray module, or RayNotInstalledError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayNotInstalledError(f"the Ray features of vitnp need Ray with Data and Serve: {EXTRA} "
                                   f"(import failed: {e})") from None
    return ray


class RayClusterError(VitnpError, ConnectionError):
    """The Ray cluster could not be started or reached."""


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Connect to the cluster at `address`, or start a local one (no dashboard, no usage stats)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            kwargs.setdefault("include_dashboard", False)
            ray.init(num_cpus=num_cpus, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise RayClusterError(f"cannot connect to {where}: {e}".strip()) from None
    return ray


# --------------------------------------------------------------------------- shared weights


@dataclass(frozen=True)
class SharedModel:
    """A model loaded once, its packed weights in Ray's object store: pass it to actors / replicas.

    Everything but the weights (config, preprocessing, names) travels with the object, so the workers need
    neither the checkpoint files nor the Hub.
    """

    location: object       # vitnp.hub.ModelLocation
    config: object         # vitnp.config.ViTConfig
    processor: object      # vitnp.preprocess.PreprocessorConfig
    engine: EngineOptions  # a fixed weight layout (see shared_engine); threads are each process's own
    weights: object        # ray.ObjectRef of a vitnp.weights.ViTWeights
    spec: str

    @property
    def model_id(self) -> str:
        return self.location.model_id

    def load(self, threads: int | None = None):
        """A Classifier whose weights are this node's shared, read-only copy (zero-copy views)."""
        ray = require_ray()
        return classifier_with_weights(self.location, self.config, self.processor,
                                       self.engine.with_threads(threads), ray.get(self.weights))


def shared_engine(backend: str | None = None, precision: str = "fp32", threads: int | None = None) -> EngineOptions:
    """Engine options for weights shared read-only between processes: a backend whose weight layout never
    changes, `backend` ("numba" or "blas"), or None for the one auto would pick (EngineOptions.with_fixed_layout).
    """
    if backend is None:
        return EngineOptions(precision=precision, threads=threads).with_fixed_layout()
    if backend not in SHARED_BACKENDS:
        raise ParameterError(f"shared weights need a fixed weight layout: backend must be one of "
                             f"{', '.join(SHARED_BACKENDS)}, got {backend!r}")
    return EngineOptions(backend, precision, threads)


def share(model: str | os.PathLike, backend: str | None = None, precision: str = "fp32",
          options: EngineOptions | None = None, **load_kwargs) -> SharedModel:
    """Load `model` once in this process and put its weights in Ray's object store (starts Ray if needed).

    backend: "numba" or "blas" (default: the Numba GEMM, what auto picks on ViT shapes); both keep one final
    weight layout, which is what makes sharing possible. options: EngineOptions instead of backend and
    precision (an "auto" backend becomes the fixed one). load_kwargs go to vitnp.load (revision, token,
    cache_dir, local_files_only).
    """
    engine = options.with_fixed_layout() if options is not None else shared_engine(backend, precision)
    ray = require_ray()
    load_kwargs.setdefault("progress", False)
    clf = load_classifier(model, engine.with_threads(None), **load_kwargs)
    if not ray.is_initialized():
        init_ray()
    ref = ray.put(clf.weights)
    # The driver's own copy is dropped with clf: the object store holds the only one.
    return SharedModel(clf.location, clf.config, clf.processor, engine.with_threads(None), ref, str(model))


def _assigned_cpus() -> int | None:
    """CPUs Ray reserved for the calling actor/task (None outside Ray or when it reserved none)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    except Exception:  # noqa: BLE001 - outside a worker, or an older Ray: let the engine decide
        return None
    return max(1, int(cpus)) if cpus else None


# --------------------------------------------------------------------------- Ray Data


class ImageClassifier:
    """Callable class for `Dataset.map_batches`: the model is loaded once per actor, each batch classified.

    The image column is `bytes` (raw encoded images: `ray.data.read_binary_files`), `image` (decoded uint8
    arrays: `ray.data.read_images`) or, when neither is there, `path` (files the actor reads itself: no read
    tasks, so no extra Ray worker processes; the paths must be readable on the actor's node), found
    automatically or named with `column=`. Each row gets `label` and `score` (the top prediction),
    `predictions` (the top_k list of {"label", "score"}) and `error` (None, or why this row's image could not
    be classified: a bad image or a missing file never fails the batch and no row is dropped). A `bytes` or
    `image` column is left out of the output unless keep_image=True; other columns pass through.

    model: a SharedModel from `share` (weights shared per node: recommended), or a model name / directory,
    which each actor then loads privately. threads: compute threads per actor (default: the CPUs Ray
    reserved for it, `num_cpus=` of map_batches).
    """

    def __init__(self, model, top_k: int = DEFAULT_TOP_K, function_to_apply: str | None = None,
                 column: str | None = None, keep_image: bool = False, threads: int | None = None,
                 backend: str | None = None, precision: str = "fp32"):
        threads = threads or _assigned_cpus()
        if isinstance(model, SharedModel):
            self.classifier = model.load(threads)
        else:
            engine = (EngineOptions(backend, precision, threads) if backend is not None
                      else shared_engine(None, precision, threads))
            self.classifier = load_classifier(model, engine, progress=False)
        self.top_k, self.function_to_apply = validate_parameters(top_k, function_to_apply,
                                                                 self.classifier.config.num_labels)
        self.column = column
        self.keep_image = keep_image

    def __call__(self, batch):
        columns = _columns(batch)
        column = self.column or next((c for c in IMAGE_COLUMNS if c in columns), None)
        if column is None or column not in columns:
            raise ParameterError(f"no image column {self.column or ' or '.join(IMAGE_COLUMNS)!r} in the batch "
                                 f"(columns: {', '.join(columns)}); name it with column=")
        values = columns[column]
        paths = None if column == "path" else columns.get("path")
        n = len(values)
        predictions: list = [None] * n
        errors: list = [None] * n
        images, rows = [], []
        for i in range(n):
            try:
                images.append(_load(values[i], None if paths is None else paths[i]))
                rows.append(i)
            except ImageError as e:
                errors[i] = str(e)
        if images:
            results = self.classifier.classify(images, top_k=self.top_k, function_to_apply=self.function_to_apply)
            for i, result in zip(rows, results):
                predictions[i] = result
        passthrough = {name: col for name, col in columns.items()
                       if name not in OUTPUT_COLUMNS and (name != column or column == "path" or self.keep_image)}
        return _output_table(passthrough, predictions, errors)


def _columns(batch) -> dict:
    """A batch in any of map_batches' formats -> {column: sequence}."""
    if isinstance(batch, dict):
        return batch
    if hasattr(batch, "to_pydict") and hasattr(batch, "column_names"):  # pyarrow.Table
        return {name: batch.column(name).to_pylist() for name in batch.column_names}
    if hasattr(batch, "columns") and hasattr(batch, "to_numpy"):  # pandas.DataFrame
        return {name: batch[name].to_numpy() for name in batch.columns}
    raise ParameterError(f"unsupported batch type {type(batch).__name__}: use batch_format='numpy' "
                         "(the default), 'pandas' or 'pyarrow'")


def _load(value, path):
    """One cell -> RGB PIL image (ImageError if it is not an image). Errors name the path when known."""
    from .preprocess import load_image

    if isinstance(value, str):  # a path column: load_image reads the file and names it in its errors
        return load_image(value)
    if value is None:
        raise ImageError(f"'{path}': no image data" if path is not None else "no image data")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if path is None:
            return load_image(data)
        f = io.BytesIO(data)
        f.name = str(path)  # load_image's messages then read "'<path>': ...", as the local CLI's do
        return load_image(f)
    try:
        return load_image(value)
    except ImageError as e:
        raise ImageError(f"'{path}': {e}" if path is not None else str(e)) from None


def _arrow_schema():
    import pyarrow as pa

    prediction = pa.struct([("label", pa.string()), ("score", pa.float64())])
    return {"label": pa.string(), "score": pa.float64(), "predictions": pa.list_(prediction),
            "error": pa.string()}


def _output_table(passthrough: dict, predictions: list, errors: list):
    import pyarrow as pa

    types = _arrow_schema()
    arrays, names = [], []
    for name, col in passthrough.items():
        arrays.append(_to_arrow(col))
        names.append(name)
    arrays += [
        pa.array([p[0]["label"] if p else None for p in predictions], types["label"]),
        pa.array([p[0]["score"] if p else None for p in predictions], types["score"]),
        pa.array(predictions, types["predictions"]),
        pa.array(errors, types["error"]),
    ]
    return pa.Table.from_arrays(arrays, names=names + list(OUTPUT_COLUMNS))


def _to_arrow(col):
    import pyarrow as pa

    if isinstance(col, np.ndarray) and col.ndim > 1:
        from ray.data.extensions import ArrowTensorArray

        return ArrowTensorArray.from_numpy(col)
    try:
        return pa.array(list(col) if isinstance(col, np.ndarray) and col.dtype == object else col)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        from ray.data.extensions import ArrowTensorArray

        return ArrowTensorArray.from_numpy(list(col))


# --------------------------------------------------------------------------- the CLI's Ray Data job


def run_job(paths: list[str], model: SharedModel, output: str | os.PathLike, workers: int = 1,
            threads: int | None = None, batch_size: int = ClassifyOptions.batch_size, top_k: int = DEFAULT_TOP_K,
            function_to_apply: str | None = None) -> tuple[int, int]:
    """Classify `paths` on the connected Ray cluster and write `output` (.parquet or .jsonl) as rows finish,
    in input order. Returns (rows written, rows with an error)."""
    ray = require_ray()
    output = Path(output)
    fmt = output_format(output)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    threads = threads or default_threads(workers)
    tables = ()  # no paths: an empty output file, and no actor started
    if paths:
        ds = ray.data.from_arrow(path_blocks(paths, batch_size))
        ds = ds.map_batches(ImageClassifier, fn_constructor_kwargs={
            "model": model, "top_k": top_k, "function_to_apply": function_to_apply, "threads": threads,
        }, compute=ray.data.ActorPoolStrategy(size=workers), batch_size=batch_size, num_cpus=threads)
        tables = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    tmp = output.with_name(f".{output.name}.partial")
    rows = failures = 0
    writer = _ParquetOutput(tmp) if fmt == "parquet" else _JsonlOutput(tmp)
    try:
        for table in tables:
            table = table.select(["path", *OUTPUT_COLUMNS])
            writer.write(table)
            rows += table.num_rows
            failures += table.num_rows - table.column("error").null_count
    finally:
        writer.close()
    if rows != len(paths):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the Ray job returned {rows} rows for {len(paths)} images")
    tmp.replace(output)
    return rows, failures


def path_blocks(paths: list[str], batch_size: int) -> list:
    """The job's input: Arrow tables of paths that the actors read themselves, each a whole number of batches.

    Why not read_binary_files: its read tasks each need a Ray worker process, whose start-up (a Python with Ray
    imported) competes with the model actors for the cores, and its blocks (files split evenly among read
    tasks) end in ragged batches (8, 8, 3): on 2 cores that took a quarter of the throughput. Blocks built here
    on the driver start no process, and every batch but the job's last is full.
    """
    import pyarrow as pa

    batches = -(-len(paths) // batch_size)
    per_block = batch_size * min(MAX_BATCHES_PER_BLOCK, max(1, batches // TARGET_BLOCKS))
    return [pa.table({"path": paths[i:i + per_block]}) for i in range(0, len(paths), per_block)]


def output_format(output: str | os.PathLike) -> str:
    suffix = Path(output).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise ParameterError(f"--output {output}: the file name must end in .parquet or .jsonl")


def default_threads(workers: int) -> int:
    """Compute threads per actor: a node's CPUs shared among the actors it would hold."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = max((int(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=os.cpu_count() or 1)
    per_node = max(1, -(-workers // max(1, len(nodes))))
    return max(1, cpus // per_node)


class _ParquetOutput:
    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("path", pa.string()), *_arrow_schema().items()])
        self._schema = schema
        self._writer = pq.ParquetWriter(path, schema)

    def write(self, table) -> None:
        self._writer.write_table(table.cast(self._schema))

    def close(self) -> None:
        self._writer.close()


class _JsonlOutput:
    """The local CLI's --json records: {"path", "predictions"} or {"path", "error"}."""

    def __init__(self, path: Path):
        self._f = open(path, "w", encoding="utf-8")

    def write(self, table) -> None:
        for row in table.select(["path", "predictions", "error"]).to_pylist():
            record = ({"path": row["path"], "error": row["error"]} if row["error"] is not None
                      else {"path": row["path"], "predictions": row["predictions"]})
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


def run_classify(job: ClassifyOptions) -> int:
    """`vitnp classify ... --ray`: the same job as the local CLI, run by Ray Data, written to job.output."""
    if not job.output:
        print("vitnp: --ray writes its results to a file: give --output out.parquet or out.jsonl", file=sys.stderr)
        return 2
    try:
        output_format(job.output)
        require_ray()
    except VitnpError as e:
        print(f"vitnp: {e}", file=sys.stderr)
        return 2
    paths = find_images(list(job.inputs))
    if not paths:
        print(no_images_message(job.inputs), file=sys.stderr)
        return 1
    try:
        init_ray(job.ray.address)
    except VitnpError as e:
        print(f"vitnp: {e}", file=sys.stderr)
        return 2
    import ray

    try:
        try:
            model = share(job.model, options=job.engine, revision=job.revision, token=job.token,
                          cache_dir=job.cache_dir)
        except VitnpError as e:
            print(f"vitnp: {e}", file=sys.stderr)
            return 2
        workers = job.ray.workers or 1
        t0 = time.perf_counter()
        rows, failures = run_job(paths, model, job.output, workers=workers, threads=job.engine.threads,
                                 batch_size=job.batch_size, top_k=job.top_k,
                                 function_to_apply=job.function_to_apply)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    print(f"vitnp: wrote {rows} rows to {job.output} in {seconds:.1f}s ({rows / seconds:.1f} images/s, "
          f"{workers} worker{'s' if workers > 1 else ''})", file=sys.stderr)
    if failures:
        print(f"vitnp: {failures} of {rows} images failed", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------- Ray Serve


def _serve_batch_worker_class():
    from ray import serve

    from .batching import ModelWorker, deadline_error

    class ServeBatchWorker(ModelWorker):
        """A ModelWorker whose forward passes are batched by Ray Serve (@serve.batch) inside the replica."""

        def __init__(self, name, classifier, options: ServingOptions, aliases=()):
            super().__init__(name, classifier, options, aliases)
            # One engine thread: the event loop never runs a forward pass.
            self._engine = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"vitnp-engine[{name}]")
            self._batched.set_max_batch_size(options.max_batch_size)
            self._batched.set_batch_wait_timeout_s(options.max_wait_s)

        def submit(self, job):
            return asyncio.ensure_future(self._answer(job))

        async def _answer(self, job):
            result = await self._batched(job)
            if isinstance(result, BaseException):
                raise result
            return result

        @serve.batch  # sizes and wait set per worker in __init__, from its ServingOptions
        async def _batched(self, jobs: list) -> list:
            """(predictions, batch size) per job; a job whose scores are not finite gets its NonFiniteScoresError,
            one past its deadline DeadlineExceededError, one its request gave up on None (nobody reads it)."""
            states = self.take(jobs)
            running = [job for job, state in zip(jobs, states) if state == "run"]
            n = len(running)
            results = iter(await asyncio.get_running_loop().run_in_executor(self._engine, self.forward, running)
                           if running else [])

            def answer(result):
                return result if isinstance(result, BaseException) else (result, n)

            return [answer(next(results)) if state == "run" else
                    deadline_error(self.name) if state == "expired" else None for state in states]

        def close(self, timeout=None):
            self._engine.shutdown(wait=True)

    return ServeBatchWorker


@dataclass(frozen=True)
class ReplicaModel:
    """A model as each Serve replica gets it: its names and its shared weights."""

    name: str
    aliases: tuple[str, ...]
    shared: SharedModel


def _deployment_class():
    from ray import serve

    @serve.ingress()
    class VitnpDeployment:
        """One replica: the models (shared weights) behind vitnp.server's own Starlette application."""

        def __init__(self, models: list[ReplicaModel], options: ServingOptions, token: str | None,
                     threads: int | None, http: dict):
            from .batching import InferenceService
            from .metrics import RayMetrics
            from .registry import ModelRegistry
            from .startup import limit_image_pixels, start_worker

            from .logs import configure

            configure(http.get("log_level", "info"), http.get("log_format", "text"))
            limit_image_pixels(options)
            threads = threads or _assigned_cpus()
            registry = ModelRegistry(options, models[0].shared.engine.with_threads(threads))
            metrics = RayMetrics()
            for model in models:
                # A replica's model load: mapping the weights `vitnp serve` loaded once, and the warm-up.
                t0 = time.perf_counter()
                # A class per model: @serve.batch keeps one queue per decorated function.
                worker_class = _serve_batch_worker_class()
                registry.add(start_worker(worker_class, model.name, model.aliases, model.shared.load(threads),
                                          options))
                metrics.model_loaded(model.name, time.perf_counter() - t0)
            self.service = InferenceService(registry, options, metrics)
            self.options = options
            self.token = token
            self.cors_allow_origins = tuple(http.get("cors_allow_origins", ()))

        def check_health(self):
            """Ray Serve's health check of the replica: the service's readiness (every model served, every
            engine answering); a replica that fails it is restarted."""
            ready, reason = self.service.readiness()
            if not ready:
                raise RuntimeError(f"vitnp replica not ready: {reason}")

        def __serve_build_asgi_app__(self):
            from .server import create_app

            return without_response_header(create_app(self.service, self.token, self.options,
                                                      self.cors_allow_origins), b"x-request-id")

    return VitnpDeployment


def without_response_header(app, name: bytes):
    """An ASGI app answering as `app` does, less one response header. Ray Serve's proxy puts x-request-id on
    every response itself (the request's, or the id it made and passed on to the replica in the request's
    headers, which vitnp.server then logs and echoes): the replica's own copy would repeat it."""

    async def wrapped(scope, receive, send):
        async def send_without(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                  if k.lower() != name]}
            await send(message)

        await app(scope, receive, send_without if scope["type"] == "http" else send)

    return wrapped


def serve_application(models: list[ReplicaModel], options: ServingOptions, token: str | None = None,
                      threads: int | None = None, replicas: int | None = 1,
                      autoscaling: tuple[int, int] | None = None, num_cpus: float | None = None,
                      log_level: str = "info", log_format: str = "text", cors_allow_origins: tuple[str, ...] = ()):
    """A bound Ray Serve application: `serve.run(app, route_prefix="/")`.

    models: one ReplicaModel per model, the first being the default for POST /.
    threads: compute threads per replica (default: the CPUs Ray reserved for it).
    replicas: a fixed count; autoscaling: (min, max) replicas, scaled on ongoing requests instead.
    num_cpus: CPUs Ray reserves per replica (default: its compute threads, or 1).
    log_level, log_format, cors_allow_origins: as ServerOptions' (vitnp.logs.configure, create_app).
    Each replica's health check (Ray Serve's check_health) is the service's readiness; its metrics go to its
    own /metrics and through ray.util.metrics to Ray's Prometheus export (vitnp.metrics.RayMetrics).
    """
    from ray import serve

    deployment_options = {
        "ray_actor_options": {"num_cpus": num_cpus if num_cpus is not None else (threads or 1)},
        "max_ongoing_requests": max(options.max_queue + options.max_batch_size, MIN_ONGOING_REQUESTS)}
    if autoscaling:
        lo, hi = autoscaling
        deployment_options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                                                    "target_ongoing_requests": options.max_batch_size}
    else:
        deployment_options["num_replicas"] = replicas or 1
    deployment = serve.deployment(_deployment_class(), name="vitnp", **deployment_options)
    http = {"log_level": log_level, "log_format": log_format, "cors_allow_origins": tuple(cors_allow_origins)}
    return deployment.bind(models, options, token, threads, http)


def run_serve(options: ServerOptions) -> int:
    """`vitnp serve --ray`: the same server as `vitnp serve`, as a Ray Serve application."""
    import signal
    import threading

    try:
        named: list[NamedModel] = name_models(options.models)
        require_ray()
        ray = init_ray(options.ray.address)
    except VitnpError as e:
        print(f"vitnp serve: {e}", file=sys.stderr)
        return 2
    from ray import serve

    try:
        models = []
        for model in named:
            try:
                shared = share(model.spec, options=options.engine, revision=options.revision)
            except VitnpError as e:
                print(f"vitnp serve: cannot load {model.spec}: {e}", file=sys.stderr)
                return 2
            models.append(ReplicaModel(model.name, model.aliases, shared))
        autoscaling = options.ray.autoscale
        # Compute threads per replica (Ray reserves as many CPUs for it): the cores of a node shared among
        # the replicas it would hold (at the most replicas autoscaling may start).
        threads = options.engine.threads or default_threads(autoscaling[1] if autoscaling else options.ray.replicas)
        serve.start(http_options={"host": options.host, "port": options.port})
        app = serve_application(models, options.serving, token=options.token, threads=threads,
                                replicas=options.ray.replicas, autoscaling=autoscaling, log_level=options.log_level,
                                log_format=options.log_format, cors_allow_origins=options.cors_allow_origins)
        serve.run(app, name="vitnp", route_prefix="/")
        log.info("Ray Serve is answering on http://%s:%d", options.host, options.port)
        print(f"vitnp serve: Ray Serve application ready on http://{options.host}:{options.port}", file=sys.stderr,
              flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
