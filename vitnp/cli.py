"""The `vitnp` command: `vitnp classify ...` and `vitnp serve ...`."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "google/vit-base-patch16-224"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
# Below this many images a progress bar is noise.
PROGRESS_MIN_IMAGES = 16


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitnp", description="ViT / DeiT image classification in NumPy + Numba.")
    parser.add_argument("--version", action=VersionAction, nargs=0,
                        help="show the version, the CPU and which kernel ISA runs, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("classify", help="classify image files or directories of images",
                       description="Classify images. Directories are searched recursively for image files.")
    c.add_argument("inputs", nargs="+", metavar="IMAGE_DIR_OR_GLOB")
    c.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"Hub id, local directory or bundled:<name> (default: {DEFAULT_MODEL})")
    c.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    c.add_argument("--token", help="Hub token for private or gated models (default: HF_TOKEN / saved login)")
    c.add_argument("--cache-dir", help="Hugging Face cache directory (default: HF_HUB_CACHE)")
    c.add_argument("--top-k", type=positive_int, default=5, help="labels per image (default 5)")
    c.add_argument("--function-to-apply", choices=["softmax", "sigmoid", "none"],
                   help="score function (default: the model's: softmax for single-label models)")
    c.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    c.add_argument("--backend", choices=["auto", "numba", "blas"], default="auto", help="GEMM backend")
    c.add_argument("--threads", type=positive_int, help="compute threads (default: NUMBA_NUM_THREADS or all cores)")
    c.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="weights in float32 (default: parity with transformers), bfloat16, or int8 with dynamic "
                        "activation quantisation (see docs/precision.md)")
    c.add_argument("--json", action="store_true", help="print one JSON object per image (JSON lines)")
    r = c.add_argument_group("Ray (pip install 'vitnp[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="run the job on Ray Data: a local Ray cluster, or the one at --ray-address")
    r.add_argument("--ray-address", metavar="ADDR", help="address of an existing Ray cluster (e.g. auto, ray://host:10001)")
    r.add_argument("--workers", type=positive_int, metavar="N", help="model actors (default 1)")
    r.add_argument("--output", "-o", metavar="FILE.parquet|FILE.jsonl",
                   help="with --ray: write the results to this Parquet or JSON-lines file")
    c.set_defaults(func=run_classify)

    s = sub.add_parser("serve", help="serve models over HTTP (Hugging Face Inference API protocol)",
                       add_help=False)
    s.set_defaults(func=None)
    return parser


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


def find_images(inputs: list[str]) -> list[str]:
    """Expand directories (recursively, sorted) and glob patterns (sorted; ** recurses) into image files;
    plain paths are kept as given."""
    found = []
    for item in inputs:
        if not os.path.exists(item) and glob.has_magic(item):
            found.extend(find_images(sorted(glob.glob(item, recursive=True))) or [item])
        elif os.path.isdir(item):
            for root, dirs, files in os.walk(item):
                dirs.sort()
                found.extend(os.path.join(root, f) for f in sorted(files)
                             if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith("."))
        else:
            found.append(item)
    return found


def run_classify(args) -> int:
    from . import load
    from .errors import VitnpError
    from .preprocess import load_image

    if args.ray:
        from .ray import run_classify as run_on_ray

        return run_on_ray(args)
    if args.output or args.workers or args.ray_address:
        print("vitnp: --output, --workers and --ray-address go with --ray", file=sys.stderr)
        return 2
    paths = find_images(args.inputs)
    if not paths:
        print(f"vitnp: no image files found in {' '.join(args.inputs)}", file=sys.stderr)
        return 1
    try:
        clf = load(args.model, revision=args.revision, token=args.token, cache_dir=args.cache_dir,
                   backend=args.backend, threads=args.threads, precision=args.precision)
    except VitnpError as e:
        print(f"vitnp: {e}", file=sys.stderr)
        return 2

    show_progress = sys.stderr.isatty() and len(paths) >= PROGRESS_MIN_IMAGES
    failures = 0
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="img", disable=not show_progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            images, good = [], []
            for path in chunk:
                try:
                    images.append(load_image(path))
                    good.append(path)
                except VitnpError as e:
                    failures += 1
                    _emit(args, path, error=str(e), bar=bar)
            if images:
                results = clf.classify(images, top_k=args.top_k, function_to_apply=args.function_to_apply)
                for path, predictions in zip(good, results):
                    _emit(args, path, predictions=predictions, bar=bar)
            bar.update(len(chunk))
    if failures:
        print(f"vitnp: {failures} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failures else 0


def _emit(args, path: str, predictions=None, error=None, bar=None) -> None:
    if args.json:
        record = {"path": path, "predictions": predictions} if error is None else {"path": path, "error": error}
        text = json.dumps(record)
        stream = sys.stdout
    elif error is not None:
        text, stream = f"{path}: error: {error}", sys.stderr
    else:
        width = max(len(p["label"]) for p in predictions)
        lines = [path] + [f"  {p['score']:8.4f}  {p['label']:<{width}}" for p in predictions]
        text, stream = "\n".join(lines), sys.stdout
    if bar is not None and not bar.disable:
        bar.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ray" not in argv and argv[:1] in (["classify"], ["serve"]):
        skip_numba_scipy_probe()
    serving = bool(argv) and argv[0] == "serve"
    if not serving:
        args = build_parser().parse_args(argv)  # --help / --version / usage errors need no engine
    error = isa_error()
    if error:
        print(f"vitnp: {error}", file=sys.stderr)
        return 2
    if serving:
        from .server import main as serve_main

        return serve_main(argv[1:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("vitnp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`vitnp classify ... | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
