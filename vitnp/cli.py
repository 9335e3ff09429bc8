"""The `vitnp` command: `vitnp classify ...`, `vitnp serve ...` (each also `--ray`), `vitnp compile ...`,
`vitnp --version`.

This is the one module that reads argv: it parses every command line into the settings values of
vitnp.options (ClassifyOptions, ServerOptions, holding EngineOptions, ServingOptions and RayOptions), which
validate themselves, and hands them to the code that runs the command.  The parsers' defaults are those
values' defaults.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from .errors import ParameterError
from .postprocess import FUNCTIONS
from .options import (
    BACKENDS,
    DEFAULT_MODEL,
    ISAS,
    LOG_FORMATS,
    LOG_LEVELS,
    PRECISIONS,
    ClassifyOptions,
    EngineOptions,
    RayOptions,
    ServerOptions,
    ServingOptions,
    defaults,
)

DEFAULT_TOKEN_ENV = "VITNP_API_TOKEN"
PRECISION_HELP = ("weights in float32 (default: parity with transformers), bfloat16, or int8 with dynamic "
                  "activation quantisation (see docs/precision.md)")


# --------------------------------------------------------------------------- argument types


def _number_type(parse, kind: str, minimum: float, strict: bool):
    """An argparse type: `parse` of the text, finite, >= minimum (> it when strict); errors name the kind."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
        return value

    return convert


positive_int = _number_type(int, "a positive integer", 1, strict=False)
non_negative_int = _number_type(int, "a non-negative integer", 0, strict=False)
non_negative_float = _number_type(float, "a non-negative number", 0.0, strict=False)
positive_float = _number_type(float, "a positive number", 0.0, strict=True)


def replica_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas, got {text!r}") from None
    if not sep or lo_n < 1 or hi_n < lo_n:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo_n, hi_n


# --------------------------------------------------------------------------- the parsers


def add_classify_parser(sub) -> None:
    job = defaults(ClassifyOptions)
    c = sub.add_parser("classify", help="classify image files or directories of images",
                       description="Classify images. Directories are searched recursively for image files.")
    c.add_argument("inputs", nargs="+", metavar="IMAGE_DIR_OR_GLOB")
    c.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"Hub id, local directory or bundled:<name> (default: {DEFAULT_MODEL})")
    c.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    c.add_argument("--token", help="Hub token for private or gated models (default: HF_TOKEN / saved login)")
    c.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HUB_CACHE)")
    c.add_argument("--top-k", type=positive_int, default=job["top_k"],
                   help=f"labels per image (default {job['top_k']})")
    c.add_argument("--function-to-apply", choices=FUNCTIONS,
                   help="score function (default: the model's: softmax for single-label models)")
    c.add_argument("--batch-size", type=positive_int, default=job["batch_size"],
                   help=f"images per forward pass (default {job['batch_size']})")
    c.add_argument("--backend", choices=BACKENDS, default=EngineOptions.backend, help="GEMM backend")
    c.add_argument("--threads", type=positive_int, help="compute threads (default: NUMBA_NUM_THREADS or all cores)")
    c.add_argument("--precision", choices=PRECISIONS, default=EngineOptions.precision, help=PRECISION_HELP)
    c.add_argument("--json", action="store_true", help="print one JSON object per image (JSON lines)")
    r = c.add_argument_group("Ray (pip install 'vitnp[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="run the job on Ray Data: a local Ray cluster, or the one at --ray-address")
    r.add_argument("--ray-address", metavar="ADDR", help="address of an existing Ray cluster (e.g. auto, ray://host:10001)")
    r.add_argument("--workers", type=positive_int, metavar="N", help="model actors (default 1)")
    r.add_argument("--output", "-o", metavar="FILE.parquet|FILE.jsonl",
                   help="with --ray: write the results to this Parquet or JSON-lines file")


def add_serve_parser(sub) -> None:
    d = defaults(ServingOptions)
    server = defaults(ServerOptions)
    p = sub.add_parser(
        "serve", help="serve models over HTTP (Hugging Face Inference API protocol)",
        description="Serve ViT/DeiT image classifiers over HTTP with the Hugging Face Inference API protocol "
                    "(POST /models/<id>, POST /, GET /health, GET /models).",
    )
    p.add_argument("--model", "-m", action="append", default=[], metavar="[NAME=]MODEL",
                   help="Hub id, local directory or bundled:<name>; repeat for several models. Loaded and warmed "
                        "up before the port opens; the first is the default for POST /. NAME=DIR serves a "
                        "directory as /models/NAME (a directory also answers to its own directory name)")
    p.add_argument("--host", default=server["host"], help=f"address to listen on (default {server['host']})")
    p.add_argument("--port", type=int, default=server["port"], help=f"port (default {server['port']})")
    p.add_argument("--max-batch-size", type=positive_int, default=d["max_batch_size"],
                   help=f"images per forward pass (default {d['max_batch_size']})")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=d["max_wait_ms"],
                   help=f"how long a forward pass waits for its batch to fill (default {d['max_wait_ms']:g} ms)")
    p.add_argument("--max-queue", type=positive_int, default=d["max_queue"],
                   help=f"requests per model waiting for the engine before new ones get 429 "
                        f"(default {d['max_queue']})")
    p.add_argument("--load-on-demand", action="store_true",
                   help="load other Hub ids / bundled models on their first request (503 + estimated_time "
                        "while loading)")
    p.add_argument("--token-env", metavar="VAR",
                   help=f"require 'Authorization: Bearer <token>' with the token in environment variable VAR "
                        f"(default: {DEFAULT_TOKEN_ENV} if set, else no authentication)")
    p.add_argument("--max-body-mb", type=positive_float, default=d["max_body_mb"],
                   help=f"largest request body (default {d['max_body_mb']:g} MB)")
    p.add_argument("--max-image-pixels", type=positive_int, default=d["max_image_pixels"],
                   help="largest image (width x height) accepted; bigger ones get 400 (default: Pillow's "
                        "decompression-bomb limit, about 89 million)")
    p.add_argument("--revision", help="Hub revision for the Hub models (default: main)")
    p.add_argument("--cache-size", type=non_negative_int, default=d["cache_size"],
                   help=f"results kept in the LRU result cache (default {d['cache_size']}; 0 disables it)")
    p.add_argument("--threads", type=positive_int, help="compute threads per forward pass (default: all cores)")
    p.add_argument("--decode-threads", type=positive_int, default=d["decode_threads"],
                   help=f"threads decoding and preprocessing images (default {d['decode_threads']})")
    p.add_argument("--backend", choices=BACKENDS, default=EngineOptions.backend, help="GEMM backend")
    p.add_argument("--precision", choices=PRECISIONS, default=EngineOptions.precision, help=PRECISION_HELP)
    p.add_argument("--body-timeout", type=positive_float, default=d["body_timeout"],
                   help=f"seconds a client may take to send its body (default {d['body_timeout']:g})")
    p.add_argument("--graceful-timeout", type=positive_float, default=d["graceful_timeout"],
                   help=f"on SIGTERM/Ctrl-C, seconds to let in-flight requests finish "
                        f"(default {d['graceful_timeout']:g})")
    p.add_argument("--load-timeout", type=non_negative_float, default=d["load_timeout"],
                   help=f"seconds a request waits for a model that is loading before it gets 503 + estimated_time "
                        f"(default {d['load_timeout']:g}; 'x-wait-for-model: false' never waits)")
    p.add_argument("--request-timeout", type=positive_float, default=d["request_timeout"],
                   help="seconds a request may wait in the queue; one still queued then is dropped and answered "
                        "503 (default: no deadline)")
    p.add_argument("--failure-memory", type=non_negative_float, default=d["failure_memory"],
                   help=f"seconds a failed on-demand model lookup or load is answered from memory instead of "
                        f"retried (default {d['failure_memory']:g})")
    p.add_argument("--hub-timeout", type=positive_float, default=d["hub_timeout"],
                   help=f"seconds a Hub lookup of an on-demand model may take (default {d['hub_timeout']:g})")
    r = p.add_argument_group("Ray Serve (pip install 'vitnp[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="serve with Ray Serve (same protocol): a local Ray cluster, or the one at --ray-address")
    r.add_argument("--ray-address", metavar="ADDR", help="address of an existing Ray cluster")
    replicas = defaults(RayOptions)["replicas"]
    r.add_argument("--replicas", type=positive_int, default=replicas, metavar="N",
                   help=f"with --ray: replicas (default {replicas})")
    r.add_argument("--autoscale", type=replica_range, metavar="MIN:MAX",
                   help="with --ray: autoscale between MIN and MAX replicas on ongoing requests")
    p.add_argument("--log-level", default=server["log_level"], choices=LOG_LEVELS,
                   help=f"log level (default {server['log_level']}; the access log is logger vitnp.access at info)")
    p.add_argument("--log-format", default=server["log_format"], choices=LOG_FORMATS,
                   help=f"log lines as text or one JSON object per line (default {server['log_format']})")
    p.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (scheme://host[:port], or * for any) call the server; "
                        "repeatable (default: no CORS headers)")
    p.add_argument("--keep-alive-timeout", type=positive_float, default=server["keep_alive_timeout"],
                   help=f"seconds an idle keep-alive connection stays open (default {server['keep_alive_timeout']:g})")
    p.add_argument("--header-timeout", type=positive_float, default=server["header_timeout"],
                   help=f"seconds a connection has to send a whole request head before it is closed "
                        f"(default {server['header_timeout']:g})")
    p.add_argument("--max-connections", type=positive_int, default=server["max_connections"],
                   help=f"open connections (or requests in progress) past which new requests get 503 "
                        f"(default {server['max_connections']})")


def add_compile_parser(sub) -> None:
    p = sub.add_parser(
        "compile", help="compile the kernels into the cache ahead of time (e.g. in an image build step)",
        description="Compile the kernels a model runs with these options into the kernel cache (VITNP_CACHE_DIR, "
                    "else XDG_CACHE_HOME/vitnp, else ~/.cache/vitnp), so the first classify or serve on this "
                    "machine loads them instead of compiling; says what it compiled and where.")
    p.add_argument("--model", "-m", metavar="MODEL",
                   help="also load this model (Hub id, local directory or bundled:<name>) and run it once, which "
                        "stores the auto backend's decisions for its shapes (default: kernels only)")
    p.add_argument("--revision", help="Hub revision of --model")
    p.add_argument("--precision", choices=PRECISIONS, default=EngineOptions.precision, help=PRECISION_HELP)
    p.add_argument("--backend", choices=BACKENDS, default=EngineOptions.backend, help="GEMM backend")
    p.add_argument("--isa", choices=ISAS, default=EngineOptions.isa,
                   help="the kernels' instruction set (default auto: the widest this CPU runs; a narrower one "
                        "builds what a CPU of that class runs, as VITNP_ISA does)")
    p.add_argument("--threads", type=positive_int, help="compute threads (default: NUMBA_NUM_THREADS or all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitnp", description="ViT / DeiT image classification in NumPy + Numba.")
    parser.add_argument("--version", action=VersionAction, nargs=0,
                        help="show the version, the CPU and which kernel ISA runs, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_classify_parser(sub)
    add_serve_parser(sub)
    add_compile_parser(sub)
    return parser


# --------------------------------------------------------------------------- argv -> settings values


def classify_options(args: argparse.Namespace) -> ClassifyOptions:
    if not args.ray and (args.output or args.workers or args.ray_address):
        raise ParameterError("--output, --workers and --ray-address go with --ray")
    return ClassifyOptions(
        inputs=tuple(args.inputs), model=args.model, revision=args.revision, token=args.token,
        cache_dir=args.cache_dir, top_k=args.top_k, function_to_apply=args.function_to_apply,
        batch_size=args.batch_size, json=args.json, output=args.output,
        engine=EngineOptions(args.backend, args.precision, args.threads),
        ray=RayOptions(address=args.ray_address, workers=args.workers) if args.ray else None)


def server_options(args: argparse.Namespace) -> ServerOptions:
    if not args.model and not args.load_on_demand:
        raise ParameterError("give at least one --model (or --load-on-demand)")
    token = resolve_token(args.token_env)
    if args.ray and args.load_on_demand:
        raise ParameterError("--load-on-demand is not available with --ray: name the models with --model")
    if not args.ray and (args.ray_address or args.autoscale or args.replicas != defaults(RayOptions)["replicas"]):
        raise ParameterError("--ray-address, --replicas and --autoscale go with --ray")
    serving = ServingOptions(
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body_mb=args.max_body_mb, body_timeout=args.body_timeout, cache_size=args.cache_size,
        decode_threads=args.decode_threads, max_image_pixels=args.max_image_pixels,
        graceful_timeout=args.graceful_timeout,
        load_timeout=args.load_timeout, request_timeout=args.request_timeout, failure_memory=args.failure_memory,
        hub_timeout=args.hub_timeout)
    return ServerOptions(
        models=tuple(args.model), load_on_demand=args.load_on_demand, revision=args.revision, host=args.host,
        port=args.port, token=token, log_level=args.log_level,
        engine=EngineOptions(args.backend, args.precision, args.threads), serving=serving,
        ray=RayOptions(address=args.ray_address, replicas=args.replicas, autoscale=args.autoscale)
        if args.ray else None,
        log_format=args.log_format, cors_allow_origins=tuple(args.cors_allow_origin),
        keep_alive_timeout=args.keep_alive_timeout, header_timeout=args.header_timeout,
        max_connections=args.max_connections)


def resolve_token(token_env: str | None) -> str | None:
    if token_env:
        token = os.environ.get(token_env, "")
        if not token:
            raise ParameterError(f"--token-env {token_env}: environment variable {token_env} is not set or empty")
        return token
    return os.environ.get(DEFAULT_TOKEN_ENV) or None


def compile_options(args: argparse.Namespace):
    from .compile import CompileOptions

    return CompileOptions(model=args.model, revision=args.revision,
                          engine=EngineOptions(args.backend, args.precision, args.threads, args.isa))


def command_options(args: argparse.Namespace):
    if args.command == "compile":
        return compile_options(args)
    return server_options(args) if args.command == "serve" else classify_options(args)


def parse_command(argv: list[str]):
    """A command line (without the program name) -> its settings value. Usage errors exit as argparse does;
    a value or combination that makes no sense raises ParameterError."""
    return command_options(build_parser().parse_args(argv))


# --------------------------------------------------------------------------- --version


def version_text() -> str:
    """The version plus what the engine runs on: the kernels' ISA (and whether VITNP_ISA forced it), the
    code generator's CPU, the cores and the library versions."""
    from . import __version__

    lines = [f"vitnp {__version__}"]
    try:
        import numba
        import numpy

        from .kernels import isa
    except RuntimeError as e:  # kernels.isa.IsaError
        return "\n".join(lines + [f"kernels: unavailable: {e}"])
    d = isa.describe()
    lines.append(f"kernels: {d['isa']}{' (forced by VITNP_ISA)' if d['forced'] else ''}, GEMM tile {d['gemm_tile']}, "
                 f"{d['vector_lanes']} float32 lanes; code generated for {d['codegen_cpu']}")
    lines.append(f"cpu: {d['cpu_model']} ({d['host_cpu']}, widest ISA {d['host_isa']}), {os.cpu_count()} cores")
    lines.append(f"numba {numba.__version__}, numpy {numpy.__version__}")
    return "\n".join(lines)


class VersionAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


# --------------------------------------------------------------------------- running a command


def isa_error() -> str | None:
    """The problem with VITNP_ISA (unknown, or wider than this CPU runs), if any."""
    try:
        from .kernels import isa  # noqa: F401  (reads VITNP_ISA once per process)
    except RuntimeError as e:  # kernels.isa.IsaError
        return str(e)
    return None


def skip_numba_scipy_probe() -> None:
    """Numba imports SciPy's BLAS wrappers when it starts, only to offer np.linalg inside jitted code; where
    SciPy is installed that costs 29 MB of RSS and ~0.15 s.  A vitnp CLI process runs no other jitted code
    and vitnp's kernels do not use np.linalg, so it tells Python that module is absent (library users are
    not affected: this runs only in the `vitnp` command, and not with --ray, whose workers host user code)."""
    if "scipy.linalg" not in sys.modules:
        sys.modules["scipy.linalg"] = None


def run(command) -> int:
    from .compile import CompileOptions

    if isinstance(command, CompileOptions):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from .compile import run_compile

        return run_compile(command)
    if isinstance(command, ServerOptions):
        from .logs import configure

        configure(command.log_level, command.log_format)
        if command.ray is not None:
            from .ray import run_serve

            return run_serve(command)
        from .server import run_server

        return run_server(command)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if command.ray is not None:
        from .ray import run_classify as run_on_ray

        return run_on_ray(command)
    from .files import run_classify

    return run_classify(command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ray" not in argv and argv[:1] in (["classify"], ["serve"], ["compile"]):
        skip_numba_scipy_probe()
    args = build_parser().parse_args(argv)  # --help / --version / usage errors need no engine
    if args.command == "compile" and args.isa != "auto":
        from .classifier import use_isa

        try:
            use_isa(args.isa)  # before isa_error loads the kernels: they are built for it
        except ParameterError as e:
            print(f"vitnp compile: {e}", file=sys.stderr)
            return 2
    error = isa_error()
    if error:
        print(f"vitnp: {error}", file=sys.stderr)
        return 2
    prefix = {"serve": "vitnp serve", "compile": "vitnp compile"}.get(args.command, "vitnp")
    try:
        command = command_options(args)
    except ParameterError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    try:
        return run(command)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`vitnp classify ... | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
