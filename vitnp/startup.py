"""How a served model starts, written once for `vitnp serve` and every Ray Serve replica: name it, load it,
limit the images it accepts, warm it up, and put it behind a worker.

`load_classifier` and `classifier_with_weights` are the only places the serving side (and the CLI, and the
Ray actors) build a Classifier: they turn EngineOptions into the classifier's arguments.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .batching import FORWARD_LOCK
from .errors import ModelNotFoundError
from .hub import served_names, split_named_model
from .options import EngineOptions, ServingOptions

log = logging.getLogger("vitnp.server")


@dataclass(frozen=True)
class NamedModel:
    """A model named on the command line: the names it answers to, and what to load (Hub id, directory or
    bundled:<name>)."""

    name: str
    aliases: tuple[str, ...]
    spec: str


def name_models(model_args: Iterable[str]) -> list[NamedModel]:
    """--model [NAME=]MODEL arguments -> the models and their names; two models may not share a name (an alias
    an earlier model already answers to is dropped)."""
    models: list[NamedModel] = []
    taken: set[str] = set()
    for arg in model_args:
        alias, spec = split_named_model(arg)
        name, aliases = served_names(spec, alias)
        if name in taken:
            raise ModelNotFoundError(f"two --model arguments are both named {name!r}; name them with "
                                     "--model NAME=DIR")
        aliases = tuple(a for a in aliases if a not in taken)
        taken.update((name, *aliases))
        models.append(NamedModel(name, aliases, spec))
    return models


def load_classifier(model: str | os.PathLike, engine: EngineOptions, **load_kwargs):
    """vitnp.load with these engine options; load_kwargs: revision, token, cache_dir, local_files_only,
    progress."""
    from .classifier import load

    return load(model, options=engine, **load_kwargs)


def classifier_with_weights(location, config, processor, engine: EngineOptions, weights):
    """A Classifier around already-built weights (a Ray node's shared read-only copy)."""
    from .classifier import Classifier

    return Classifier(location, config, processor, engine, weights=weights)


def limit_image_pixels(options: ServingOptions) -> None:
    """Let Pillow's own decompression-bomb check (a second line of defence behind the size check the workers
    make from each image's header) admit every image max_image_pixels admits."""
    if options.max_image_pixels is not None:
        from PIL import Image

        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < options.max_image_pixels:
            Image.MAX_IMAGE_PIXELS = options.max_image_pixels


def start_worker(worker_class, name: str, aliases: tuple[str, ...], classifier, options: ServingOptions):
    """Warm the classifier up (unless options.warmup is off) and start its worker, a batching.ModelWorker
    subclass."""
    if options.warmup:
        sizes = options.warmup_batch_sizes
        with FORWARD_LOCK:
            seconds = classifier.warmup(sizes)
        log.info("model %s warmed up for batch sizes %s in %.1fs", name, sizes, seconds)
    return worker_class(name, classifier, options, aliases)
