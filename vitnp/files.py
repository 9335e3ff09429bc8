"""`vitnp classify` on this machine: find the image files, classify them in batches, print one record each.

(`vitnp classify --ray` runs the same job on Ray Data: vitnp.ray.run_classify.)
"""

from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

from .errors import VitnpError
from .options import ClassifyOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
# Below this many images a progress bar is noise.
PROGRESS_MIN_IMAGES = 16


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


def no_images_message(inputs) -> str:
    return f"vitnp: no image files found in {' '.join(inputs)}"


def run_classify(job: ClassifyOptions) -> int:
    """Classify job.inputs with job.model here; 0, or 1 if an image failed, 2 if the model cannot load."""
    from .preprocess import load_image
    from .startup import load_classifier

    paths = find_images(list(job.inputs))
    if not paths:
        print(no_images_message(job.inputs), file=sys.stderr)
        return 1
    try:
        clf = load_classifier(job.model, job.engine, revision=job.revision, token=job.token,
                              cache_dir=job.cache_dir)
    except VitnpError as e:
        print(f"vitnp: {e}", file=sys.stderr)
        return 2

    show_progress = sys.stderr.isatty() and len(paths) >= PROGRESS_MIN_IMAGES
    failures = 0
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), unit="img", disable=not show_progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), job.batch_size):
            chunk = paths[start:start + job.batch_size]
            images, good = [], []
            for path in chunk:
                try:
                    images.append(load_image(path))
                    good.append(path)
                except VitnpError as e:
                    failures += 1
                    emit(job.json, path, error=str(e), bar=bar)
            if images:
                results = clf.classify(images, top_k=job.top_k, function_to_apply=job.function_to_apply)
                for path, predictions in zip(good, results):
                    emit(job.json, path, predictions=predictions, bar=bar)
            bar.update(len(chunk))
    if failures:
        print(f"vitnp: {failures} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failures else 0


def emit(as_json: bool, path: str, predictions=None, error=None, bar=None) -> None:
    """One image's record: a JSON line, or the path and a table of scores (errors go to stderr)."""
    if as_json:
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
