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

Ray Serve: `serve_application(...)` builds a deployment whose replicas run exactly vitnp.server's Starlette
application (same routes, parsing, errors, headers: `create_app`), over vitnp.batching's InferenceService;
only the worker that runs forward passes differs, batching with `@serve.batch` instead of a thread.
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

log = logging.getLogger("vitnp.ray")

EXTRA = "pip install 'vitnp[ray]'"
# The backends whose weight layout never changes after loading ("auto" re-lays weights out per process on its
# first timed decision, which would turn the shared read-only copy into a private one).
SHARED_BACKENDS = ("numba", "blas")
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
    backend: str
    weights: object        # ray.ObjectRef of a vitnp.weights.ViTWeights
    spec: str
    precision: str = "fp32"

    @property
    def model_id(self) -> str:
        return self.location.model_id

    def load(self, threads: int | None = None):
        """A Classifier whose weights are this node's shared, read-only copy (zero-copy views)."""
        ray = require_ray()
        from .classifier import Classifier

        weights = ray.get(self.weights)
        return Classifier(self.location, self.config, self.processor, self.backend, threads, weights=weights,
                          precision=self.precision)


def share(model: str | os.PathLike, backend: str = "numba", precision: str = "fp32", **load_kwargs) -> SharedModel:
    """Load `model` once in this process and put its weights in Ray's object store (starts Ray if needed).

    backend: "numba" (default) or "blas"; both keep one final weight layout, which is what makes sharing
    possible. load_kwargs go to vitnp.load (revision, token, cache_dir, local_files_only).
    """
    if backend not in SHARED_BACKENDS:
        raise ParameterError(f"shared weights need a fixed weight layout: backend must be one of "
                             f"{', '.join(SHARED_BACKENDS)}, got {backend!r}")
    ray = require_ray()
    from .classifier import load

    load_kwargs.setdefault("progress", False)
    clf = load(model, backend=backend, precision=precision, **load_kwargs)
    if not ray.is_initialized():
        init_ray()
    ref = ray.put(clf.weights)
    # The driver's own copy is dropped with clf: the object store holds the only one.
    return SharedModel(clf.location, clf.config, clf.processor, backend, ref, str(model), clf.precision)


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

    def __init__(self, model, top_k: int = 5, function_to_apply: str | None = None, column: str | None = None,
                 keep_image: bool = False, threads: int | None = None, backend: str = "numba",
                 precision: str = "fp32"):
        from .postprocess import validate_parameters

        threads = threads or _assigned_cpus()
        if isinstance(model, SharedModel):
            self.classifier = model.load(threads)
        else:
            from .classifier import load

            self.classifier = load(model, backend=backend, threads=threads, progress=False, precision=precision)
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


def expand_inputs(inputs: list[str]) -> list[str]:
    """Directories (recursively) and glob patterns -> image files, as the local CLI finds them."""
    from .cli import find_images

    return find_images(inputs)


def run_job(paths: list[str], model: SharedModel, output: str | os.PathLike, workers: int = 1,
            threads: int | None = None, batch_size: int = 8, top_k: int = 5,
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


def run_classify(args) -> int:
    """`vitnp classify ... --ray`: the same job as the local CLI, run by Ray Data."""
    if not args.output:
        print("vitnp: --ray writes its results to a file: give --output out.parquet or out.jsonl", file=sys.stderr)
        return 2
    try:
        output_format(args.output)
        require_ray()
    except VitnpError as e:
        print(f"vitnp: {e}", file=sys.stderr)
        return 2
    paths = expand_inputs(args.inputs)
    if not paths:
        print(f"vitnp: no image files found in {' '.join(args.inputs)}", file=sys.stderr)
        return 1
    # "auto" would re-lay the weights out per actor; the Numba GEMM is what it picks on ViT shapes anyway.
    backend = "numba" if args.backend == "auto" else args.backend
    try:
        init_ray(args.ray_address)
    except VitnpError as e:
        print(f"vitnp: {e}", file=sys.stderr)
        return 2
    import ray

    try:
        try:
            model = share(args.model, backend=backend, revision=args.revision, token=args.token,
                          cache_dir=args.cache_dir, precision=getattr(args, "precision", "fp32"))
        except VitnpError as e:
            print(f"vitnp: {e}", file=sys.stderr)
            return 2
        workers = args.workers or 1
        t0 = time.perf_counter()
        rows, failures = run_job(paths, model, args.output, workers=workers, threads=args.threads,
                                 batch_size=args.batch_size, top_k=args.top_k,
                                 function_to_apply=args.function_to_apply)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    print(f"vitnp: wrote {rows} rows to {args.output} in {seconds:.1f}s ({rows / seconds:.1f} images/s, "
          f"{workers} worker{'s' if workers > 1 else ''})", file=sys.stderr)
    if failures:
        print(f"vitnp: {failures} of {rows} images failed", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------- Ray Serve


def _serve_batch_worker_class():
    from ray import serve

    from .batching import FORWARD_LOCK, ModelWorker

    class ServeBatchWorker(ModelWorker):
        """A ModelWorker whose forward passes are batched by Ray Serve (@serve.batch) inside the replica."""

        def __init__(self, name, classifier, options, aliases=()):
            super().__init__(name, classifier, options, aliases)
            # One engine thread: the event loop never runs a forward pass.
            self._engine = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"vitnp-engine[{name}]")
            self._batched.set_max_batch_size(options.max_batch_size)
            self._batched.set_batch_wait_timeout_s(options.max_wait_s)

        def submit(self, pixels, top_k, function_to_apply):
            return asyncio.ensure_future(self._batched((pixels, top_k, function_to_apply)))

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def _batched(self, jobs: list) -> list:
            n = len(jobs)
            with self._waiting_lock:
                self._waiting -= n
            loop = asyncio.get_running_loop()
            predictions = await loop.run_in_executor(self._engine, self._forward, jobs)
            return [(p, n) for p in predictions]

        def _forward(self, jobs: list) -> list:
            pixels = np.concatenate([job[0] for job in jobs])
            with FORWARD_LOCK:
                logits = self.classifier.logits(pixels)
            return [self.classifier.postprocess(logits[i:i + 1], top_k, fn)[0]
                    for i, (_, top_k, fn) in enumerate(jobs)]

        def close(self, timeout=None):
            self._engine.shutdown(wait=True)

    return ServeBatchWorker


@dataclass(frozen=True)
class ServeSettings:
    """What `vitnp serve` options mean for each replica (see vitnp.server.build_parser)."""

    max_batch_size: int = 8
    max_wait_s: float = 0.005
    max_queue: int = 64
    token: str | None = None
    max_body_bytes: int = 20 * 1024 * 1024
    body_timeout: float = 30.0
    cache_size: int = 1024
    decode_threads: int = 2
    threads: int | None = None
    max_image_pixels: int | None = None
    warmup: bool = True


def _deployment_class():
    from ray import serve

    @serve.ingress()
    class VitnpDeployment:
        """One replica: the models (shared weights) behind vitnp.server's own Starlette application."""

        def __init__(self, models: list, settings: ServeSettings):
            from .batching import BatchingOptions, InferenceService, ModelRegistry

            logging.basicConfig(level=logging.INFO)
            if settings.max_image_pixels is not None:
                from PIL import Image

                Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
            options = BatchingOptions(settings.max_batch_size, settings.max_wait_s, settings.max_queue)
            registry = ModelRegistry(options, threads=settings.threads)
            threads = settings.threads or _assigned_cpus()
            for name, aliases, shared in models:
                # A class per model: @serve.batch keeps one queue per decorated function.
                worker_class = _serve_batch_worker_class()
                clf = shared.load(threads)
                if settings.warmup:
                    sizes = (1, options.max_batch_size) if options.max_batch_size > 1 else (1,)
                    log.info("model %s warmed up in %.1fs", name, clf.warmup(sizes))
                registry.add_worker(worker_class(name, clf, options, tuple(aliases)))
            self.service = InferenceService(registry, cache_size=settings.cache_size,
                                            decode_threads=settings.decode_threads)
            self.settings = settings

        def __serve_build_asgi_app__(self):
            from .server import create_app

            s = self.settings
            return create_app(self.service, s.token, s.max_body_bytes, s.body_timeout)

    return VitnpDeployment


def serve_application(models: list[tuple[str, tuple[str, ...], SharedModel]], settings: ServeSettings,
                      replicas: int | None = 1, autoscaling: tuple[int, int] | None = None,
                      num_cpus: float | None = None):
    """A bound Ray Serve application: `serve.run(app, route_prefix="/")`.

    models: (name, aliases, SharedModel) per model, the first being the default for POST /.
    replicas: a fixed count; autoscaling: (min, max) replicas, scaled on ongoing requests instead.
    num_cpus: CPUs Ray reserves per replica (default: its compute threads, or 1).
    """
    from ray import serve

    options = {"ray_actor_options": {"num_cpus": num_cpus if num_cpus is not None else (settings.threads or 1)},
               "max_ongoing_requests": max(settings.max_queue + settings.max_batch_size, 16)}
    if autoscaling:
        lo, hi = autoscaling
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                                         "target_ongoing_requests": settings.max_batch_size}
    else:
        options["num_replicas"] = replicas or 1
    deployment = serve.deployment(_deployment_class(), name="vitnp", **options)
    return deployment.bind(models, settings)


def run_serve(args, token: str | None) -> int:
    """`vitnp serve --ray`: the same server as `vitnp serve`, as a Ray Serve application."""
    import signal
    import threading

    from .server import split_model_arg
    from .batching import _startup_names

    if args.load_on_demand:
        print("vitnp serve: --load-on-demand is not available with --ray: name the models with --model",
              file=sys.stderr)
        return 2
    if not args.model:
        print("vitnp serve: give at least one --model", file=sys.stderr)
        return 2
    try:
        require_ray()
        ray = init_ray(args.ray_address)
    except VitnpError as e:
        print(f"vitnp serve: {e}", file=sys.stderr)
        return 2
    from ray import serve

    backend = "numba" if args.backend == "auto" else args.backend
    models, seen = [], set()
    try:
        for arg in args.model:
            alias, spec = split_model_arg(arg)
            try:
                shared = share(spec, backend=backend, revision=args.revision,
                               precision=getattr(args, "precision", "fp32"))
            except VitnpError as e:
                print(f"vitnp serve: cannot load {spec}: {e}", file=sys.stderr)
                return 2
            name, aliases = _startup_names(spec, alias)
            if name in seen:
                print(f"vitnp serve: two --model arguments are both named {name!r}; name them with "
                      "--model NAME=DIR", file=sys.stderr)
                return 2
            seen.update((name, *aliases))
            models.append((name, aliases, shared))
        autoscaling = tuple(args.autoscale) if args.autoscale else None
        # Compute threads per replica (Ray reserves as many CPUs for it): the cores of a node shared among
        # the replicas it would hold (at the most replicas autoscaling may start).
        threads = args.threads or default_threads(autoscaling[1] if autoscaling else args.replicas)
        settings = ServeSettings(
            max_batch_size=args.max_batch_size, max_wait_s=args.max_wait_ms / 1000.0, max_queue=args.max_queue,
            token=token, max_body_bytes=int(args.max_body_mb * 1024 * 1024), body_timeout=args.body_timeout,
            cache_size=args.cache_size, decode_threads=args.decode_threads, threads=threads,
            max_image_pixels=args.max_image_pixels)
        serve.start(http_options={"host": args.host, "port": args.port})
        app = serve_application(models, settings, replicas=args.replicas, autoscaling=autoscaling)
        serve.run(app, name="vitnp", route_prefix="/")
        log.info("Ray Serve is answering on http://%s:%d", args.host, args.port)
        print(f"vitnp serve: Ray Serve application ready on http://{args.host}:{args.port}", file=sys.stderr,
              flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
    return 0
