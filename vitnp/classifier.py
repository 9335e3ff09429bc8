"""Classifier: a loaded checkpoint plus its preprocessing, forward pass and postprocessing.

The kernels load on first use, not when this module is imported, so that EngineOptions.isa can still choose the
ISA they are built for (see use_isa).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .config import ViTConfig, load_config
from .errors import ConfigError, ParameterError
from .hub import ModelLocation, locate
from .options import EngineOptions
from .postprocess import DEFAULT_TOP_K, postprocess, validate_parameters
from .preprocess import (
    PreprocessorConfig,
    default_preprocessor_config,
    load_preprocessor_config,
    preprocess,
    target_size,
)

# Larger inputs are cut into chunks of this many images so activation memory stays bounded.
MAX_FORWARD_BATCH = 16


class Classifier:
    def __init__(self, location: ModelLocation, config: ViTConfig, processor: PreprocessorConfig,
                 options: EngineOptions = EngineOptions(), weights=None):
        """`weights`: an already-built ViTWeights (e.g. shared read-only arrays, see vitnp.ray) instead of
        loading location.path's checkpoint."""
        use_isa(options.isa)
        from . import kernels
        from .model import Workspace
        from .weights import load_weights

        self.location = location
        self.config = config
        self.processor = processor
        self.options = options
        # set_num_threads clamps to the cores Numba was started with.
        self.threads = kernels.set_num_threads(options.threads) if options.threads is not None else None
        t0 = time.perf_counter()
        self.weights = load_weights(location.path, config, options) if weights is None else weights
        self.load_seconds = time.perf_counter() - t0
        self._workspace = Workspace(config)
        # One workspace per classifier: concurrent callers take turns on the forward pass.
        self._lock = threading.Lock()
        h, w = target_size(processor)
        if (h, w) != (config.image_size, config.image_size):
            raise ConfigError(
                f"{location.path}: preprocessor_config.json produces {h}x{w} images but the model expects "
                f"{config.image_size}x{config.image_size}"
            )

    @property
    def backend(self) -> str:
        return self.options.backend

    @property
    def precision(self) -> str:
        return self.options.precision

    @property
    def model_id(self) -> str:
        return self.location.model_id

    @property
    def revision(self) -> str | None:
        return self.location.revision

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.id2label

    def __repr__(self) -> str:
        c = self.config
        return (f"Classifier({self.model_id!r}, {c.architecture}, {c.num_hidden_layers}x{c.hidden_size}, "
                f"{c.image_size}px, {c.num_labels} labels, backend={self.backend!r}"
                + (f", precision={self.precision!r})" if self.precision != "fp32" else ")"))

    def preprocess(self, images) -> np.ndarray:
        """Image(s) -> float32 (B, 3, H, W) pixel values, as transformers' PIL image processor makes them."""
        return preprocess(images, self.processor)

    def logits(self, pixel_values: np.ndarray) -> np.ndarray:
        from . import kernels
        from .model import forward

        c = self.config
        x = np.asarray(pixel_values)
        if x.ndim == 3:
            x = x[None]
        expected = (c.num_channels, c.image_size, c.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ParameterError(f"pixel_values must have shape (B, {', '.join(map(str, expected))}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], c.num_labels), np.float32)
        with self._lock:
            if self.threads is not None and kernels.get_num_threads() != self.threads:
                # Numba's thread count belongs to the calling Python thread (a server worker, say).
                kernels.set_num_threads(self.threads)
            for start in range(0, x.shape[0], MAX_FORWARD_BATCH):
                chunk = x[start:start + MAX_FORWARD_BATCH]
                out[start:start + len(chunk)] = forward(self.weights, c, chunk, self._workspace)
        return out

    def postprocess(self, logits: np.ndarray, top_k: int = DEFAULT_TOP_K, function_to_apply: str | None = None):
        return postprocess(logits, self.config.id2label, self.config.problem_type, top_k, function_to_apply)

    def classify(self, images, top_k: int = DEFAULT_TOP_K, function_to_apply: str | None = None):
        """One image -> [{"label", "score"}, ...]; a list of images -> a list of such lists."""
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        validate_parameters(top_k, function_to_apply, self.config.num_labels)  # fail before the forward pass
        results = self.postprocess(self.logits(self.preprocess(batch)), top_k, function_to_apply)
        return results[0] if single else results

    def warmup(self, batch_sizes=(1,)) -> float:
        """Compile the kernels and touch the buffers for these batch sizes; returns the seconds it took."""
        t0 = time.perf_counter()
        c = self.config
        for b in batch_sizes:
            self.logits(np.zeros((b, c.num_channels, c.image_size, c.image_size), np.float32))
        return time.perf_counter() - t0

    def backend_report(self) -> dict:
        """Which GEMM backend each layer shape uses (decided on first use when backend='auto'): "layers" reports
        the first layer of each role (its decisions cover every row count of its shape seen so far), "paths"
        counts what computes the layers of each role now (fp32, or the reduced precision a layer kept: see
        vitnp.layers)."""
        from . import kernels
        from .kernels.qlinear import describe_kernel

        w = self.weights
        linears = {"patch_embed": w.patch_embed, "qkv": w.layers[0].qkv, "attn_out": w.layers[0].attn_out,
                   "fc1": w.layers[0].fc1, "fc2": w.layers[0].fc2, "head": w.heads[0]}
        every = {"patch_embed": [w.patch_embed], "head": list(w.heads),
                 **{role: [getattr(block, role) for block in w.layers] for role in ("qkv", "attn_out", "fc1", "fc2")}}
        paths = {}
        for role, layers in every.items():
            for layer in layers:
                path = getattr(layer, "path", "fp32")
                paths.setdefault(role, {}).setdefault(path, 0)
                paths[role][path] += 1
        return {"backend": self.backend, "threads": self.threads or kernels.get_num_threads(),
                "isa": kernels.isa.describe(),
                "precision": self.precision, "precision_kernel": describe_kernel(self.precision),
                "paths": paths, "layers": {name: lin.report() for name, lin in linears.items()}}


def load(model: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
         cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
         backend: str = EngineOptions.backend, threads: int | None = EngineOptions.threads, progress: bool = True,
         precision: str = EngineOptions.precision, options: EngineOptions | None = None) -> Classifier:
    """Load a ViT/DeiT image classifier: a Hub id, a local directory, or "bundled:<name>".

    precision: "fp32" (default: parity with transformers), "bf16" (weights in bfloat16) or "int8" (dynamic
    quantisation: int8 weights per output channel, activations per row at run time); see docs/precision.md.
    options: the engine options as one EngineOptions (then backend, threads and precision stay unset).
    """
    options = engine_options(options, backend=backend, threads=threads, precision=precision)
    use_isa(options.isa)
    location = locate(model, revision, token, cache_dir, local_files_only, progress)
    config = load_config(location.path / "config.json")
    processor_path = Path(location.path) / "preprocessor_config.json"
    processor = (load_preprocessor_config(processor_path, config.model_type) if processor_path.is_file()
                 else default_preprocessor_config(config.model_type))
    compile_kernels(options, progress)
    return Classifier(location, config, processor, options)


def engine_options(options: EngineOptions | None = None, **settings) -> EngineOptions:
    """`options`, or EngineOptions(**settings) when it is None; settings other than EngineOptions' defaults
    next to `options` are an error (two answers to one question)."""
    if options is None:
        return EngineOptions(**settings)
    if not isinstance(options, EngineOptions):
        raise ParameterError(f"options must be a vitnp.options.EngineOptions, got {type(options).__name__}")
    overridden = [name for name, value in settings.items() if value != getattr(EngineOptions, name)]
    if overridden:
        raise ParameterError(f"pass {', '.join(overridden)} in options or as keyword arguments, not both")
    return options


def use_isa(isa: str) -> None:
    """Build the kernels for `isa` (an EngineOptions.isa): sets VITNP_ISA when they have not loaded yet in this
    process; once they have, their ISA is fixed and a different one is a ParameterError.  "auto" keeps what
    VITNP_ISA or the host decides."""
    if isa == "auto":
        return
    loaded = sys.modules.get("vitnp.kernels.isa")
    if loaded is None:
        os.environ["VITNP_ISA"] = isa
        try:
            from .kernels import isa as loaded
        except RuntimeError as e:  # kernels.isa.IsaError: this CPU cannot run it
            raise ParameterError(f"isa {isa!r}: {e}") from None
    if loaded.ISA != isa:
        raise ParameterError(f"isa {isa!r} was asked for, but the kernels of this process already run {loaded.ISA!r} "
                             f"(the ISA is chosen once per process: set VITNP_ISA before vitnp's kernels load)")


def compile_kernels(options: EngineOptions = EngineOptions(), progress: bool = True) -> dict:
    """Compile the kernels a forward pass with these options needs (vitnp.layers.kernel_groups), or load them from
    Numba's disk cache where it holds them for this CPU, then unmap LLVM's code (kernels.compiler_memory): with
    every kernel in the process before a weight is read, the model's peak memory never includes it.  Only a first
    run ever compiles (~5-10 s, spread over the cores); it says so on stderr, with a progress bar on a terminal.
    Returns {kernel group: seconds} for what was compiled."""
    from .kernels import compiler_memory, isa, warmup
    from .layers import kernel_groups

    groups = kernel_groups(options)
    cold = warmup.cold_groups(groups)
    bar = None
    if cold and progress:
        print(f"vitnp: compiling kernels for this CPU ({isa.cpu_model()}, {isa.ISA}); first run only, "
              f"cached afterwards", file=sys.stderr, flush=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cold), unit="group", desc="compiling", leave=False, file=sys.stderr,
                   disable=not sys.stderr.isatty())
    try:
        compiled = warmup.compile_groups(groups, on_done=(lambda group, seconds: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    compiler_memory.release_compiler_code()
    return compiled


_loaded: dict[tuple, Classifier] = {}
_loaded_lock = threading.Lock()


def classify(image, model: str = "google/vit-base-patch16-224", top_k: int = DEFAULT_TOP_K,
             function_to_apply: str | None = None, revision: str | None = None, **load_kwargs):
    """One-call classification; the loaded model is kept for the next call with the same model/revision."""
    key = (str(model), revision, tuple(sorted(load_kwargs.items())))
    with _loaded_lock:
        clf = _loaded.get(key)
        if clf is None:
            clf = _loaded[key] = load(model, revision=revision, **load_kwargs)
    return clf.classify(image, top_k=top_k, function_to_apply=function_to_apply)
