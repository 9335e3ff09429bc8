"""`vitnp compile`: fill the kernel cache ahead of time (a container image's build step, say), so that the first
`vitnp classify` or `vitnp serve` on this machine loads its kernels instead of compiling them.

Without a model it compiles the kernel groups a model built with the engine options runs (the groups depend on
the options, not on the model's sizes).  With a model it also loads it and runs one forward pass, which stores the
"auto" backend's per-shape decisions for it next to the kernels (batch sizes 1 and `vitnp classify`'s default).  Everything goes to the user cache directory
(vitnp.kernels.cachedir: VITNP_CACHE_DIR, else XDG_CACHE_HOME/vitnp, else ~/.cache/vitnp).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from .errors import VitnpError
from .options import ClassifyOptions, EngineOptions

WARMUP_BATCH_SIZES = (1, ClassifyOptions.batch_size)  # a single image, and `vitnp classify`'s batches


@dataclass(frozen=True)
class CompileOptions:
    """`vitnp compile`: the engine options to compile for, and optionally a model to warm up."""

    model: str | None = None                 # Hub id, directory or bundled:<name>; None: kernels only
    revision: str | None = None
    engine: EngineOptions = field(default_factory=EngineOptions)


@dataclass(frozen=True)
class CompileReport:
    groups: tuple[str, ...]        # the kernel groups these options run
    compiled: dict                 # {group: seconds} compiled by this call (the others were cached)
    cache_dir: str                 # where the compiled kernels are
    kept: bool                     # False when no cache directory was writable (nothing was kept)
    isa: str
    cpu: str
    seconds: float                 # the whole call
    model: str | None = None
    warmup_seconds: float | None = None  # the model's load and first forward pass


def compile_ahead(options: CompileOptions, progress: bool = False) -> CompileReport:
    """Compile (or find cached) every kernel group options.engine needs; with options.model, load it and run a
    forward pass.  Raises VitnpError subclasses for a bad model or ISA."""
    from .classifier import compile_kernels, load, use_isa

    start = time.perf_counter()
    use_isa(options.engine.isa)
    from .kernels import cachedir, isa
    from .layers import kernel_groups

    compiled = compile_kernels(options.engine, progress=progress)
    warmup_seconds = None
    if options.model is not None:
        t0 = time.perf_counter()
        load(options.model, revision=options.revision, options=options.engine, progress=progress).warmup(WARMUP_BATCH_SIZES)
        warmup_seconds = time.perf_counter() - t0
    cache_dir = cachedir.numba_cache_dir()
    return CompileReport(groups=kernel_groups(options.engine), compiled=compiled, cache_dir=cache_dir,
                         kept=cachedir.root_in_use() == cachedir.cache_root(), isa=isa.ISA, cpu=isa.cpu_model(),
                         seconds=time.perf_counter() - start, model=options.model, warmup_seconds=warmup_seconds)


def report_text(report: CompileReport, engine: EngineOptions) -> str:
    lines = [f"vitnp compile: kernels for {report.cpu} ({report.isa}), precision {engine.precision}, "
             f"backend {engine.backend}"]
    for group in report.groups:
        took = report.compiled.get(group)
        lines.append(f"  {group:<16s} " + (f"compiled in {took:.1f} s" if took is not None else "cached"))
    if report.model is not None:
        lines.append(f"  model {report.model}: loaded and run once in {report.warmup_seconds:.1f} s")
    done = (f"{len(report.compiled)} group(s) compiled" if report.compiled else "nothing to compile")
    lines.append(f"cache: {report.cache_dir} ({done}; {report.seconds:.1f} s in all)")
    return "\n".join(lines)


def run_compile(options: CompileOptions) -> int:
    """The `vitnp compile` command: 0 when the cache holds every kernel, 1 when none could be kept (no writable
    cache directory), 2 for a bad model or ISA."""
    try:
        report = compile_ahead(options, progress=True)
    except VitnpError as e:
        print(f"vitnp compile: {e}", file=sys.stderr)
        return 2
    print(report_text(report, options.engine), flush=True)
    if not report.kept:
        print("vitnp compile: no writable cache directory, so nothing was kept (set VITNP_CACHE_DIR)",
              file=sys.stderr)
        return 1
    return 0
