"""`vitnp classify` on this machine: find the image files, classify them in batches, print one record each.

Folders the user does not control are read with care: only regular files are opened (a FIFO would block
the open until a writer came, a device may act on being opened), a directory or file that cannot be read
becomes an error record like an undecodable image, each image is reduced to its pixel values before the
next one is decoded (one full-size image at a time, whatever the batch size), and every record reaches the
output whole or not at all where the system allows it (RecordWriter).

(`vitnp classify --ray` runs the same job on Ray Data: vitnp.ray.run_classify.)
"""

from __future__ import annotations

import glob
import io
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import ImageError, NonFiniteScoresError, VitnpError
from .options import ClassifyOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
# Below this many images a progress bar is noise.
PROGRESS_MIN_IMAGES = 16


# --------------------------------------------------------------------------- finding the images


@dataclass(frozen=True)
class Found:
    """One input of a classify job: a path to classify, or (error set) one that cannot be."""

    path: str
    error: str | None = None


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is, if it is not a regular file (None if it is)."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def not_regular_message(path: str, kind: str) -> str:
    return f"'{path}': {kind}, not a regular file; not opened"


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".")


def walk(top: str) -> Iterator[Found]:
    """The image files under directory `top` in os.walk's order (a directory's files by name, then its
    subdirectories by name; symbolic links to directories are not followed). A directory that cannot be
    listed and an image name that is not a regular file are error records."""
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            yield Found(directory, f"'{directory}': cannot read directory ({e.strerror or e})")
            continue
        subdirectories = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():
                    subdirectories.append(entry.path)
            elif is_image_name(entry.name):
                yield Found(entry.path, listed_file_problem(entry))
        pending.extend(reversed(subdirectories))


def listed_file_problem(entry: os.DirEntry) -> str | None:
    """The error record's text for a listed image name that is not a regular file (None if it is, or if
    stat fails: opening it then says why)."""
    try:
        kind = not_regular(entry.stat().st_mode)
    except OSError:
        return None
    return not_regular_message(entry.path, kind) if kind else None


def scan_inputs(inputs: list[str]) -> list[Found]:
    """Expand directories (recursively, sorted) and glob patterns (sorted; ** recurses) into image files,
    with an error record for each directory that cannot be read and each listed name that is not a regular
    file; plain paths are kept as given (opening them reports what is wrong with them)."""
    found = []
    for item in inputs:
        if not os.path.exists(item) and glob.has_magic(item):
            found.extend(scan_inputs(sorted(glob.glob(item, recursive=True))) or [Found(item)])
        elif os.path.isdir(item):
            found.extend(walk(item))
        else:
            found.append(Found(item))
    return found


def find_images(inputs: list[str]) -> list[str]:
    """The image files scan_inputs finds, without the error records."""
    return [f.path for f in scan_inputs(inputs) if f.error is None]


def no_images_message(inputs) -> str:
    return f"vitnp: no image files found in {' '.join(inputs)}"


def open_regular_file(path: str) -> BinaryIO:
    """`path` open for reading if it is a regular file; ImageError otherwise, with nothing else opened.

    O_NONBLOCK makes the open return at once even if a FIFO took the file's place after the check (the
    check is then repeated on what was opened); it changes nothing for reading a regular file."""
    name = f"'{path}'"

    def opener(p, flags):
        return os.open(p, flags | os.O_NONBLOCK | os.O_NOCTTY)

    try:
        kind = not_regular(os.stat(path).st_mode)
        if kind is None:
            f = open(path, "rb", opener=opener)
            kind = not_regular(os.fstat(f.fileno()).st_mode)
            if kind is not None:
                f.close()
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot open file ({e.strerror or e})") from None
    if kind is not None:
        raise ImageError(not_regular_message(path, kind))
    return f


# --------------------------------------------------------------------------- writing the records


class OutputError(Exception):
    """The records cannot be written (full disk, closed or unwritable standard output)."""


class RecordWriter:
    """Writes records to a text stream as whole lines: each record is encoded and handed to the system in
    one write (the rest again if the system takes less), past Python's buffer, so nothing of a failed
    record is left behind for a later flush. If a write fails part-way through a record and the output is
    a regular file, the file is cut back to where the record began: a full disk ends the file after the
    last whole record. A broken pipe raises BrokenPipeError (the command then stops quietly, as Unix tools
    do); any other write error raises OutputError."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            self.fd = stream.fileno()
        except io.UnsupportedOperation:  # a stream without a file descriptor (a StringIO): written as it is
            self.fd = None
            return
        try:
            stream.flush()
            self.regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(e.strerror or str(e)) from None

    def encode(self, text: str) -> bytes:
        try:
            return text.encode(self.encoding, "surrogateescape")  # file names read from disk keep their bytes
        except UnicodeEncodeError:
            return text.encode(self.encoding, "backslashreplace")

    def write(self, text: str) -> None:
        """`text` and a newline, as one piece."""
        if self.fd is None:
            self.stream.write(text + "\n")
            self.stream.flush()
            return
        data = memoryview(self.encode(text + "\n"))
        written = 0
        try:
            while written < len(data):
                written += os.write(self.fd, data[written:])
        except BrokenPipeError:
            raise
        except OSError as e:
            if written and self.regular:
                self.cut(written)
            raise OutputError(e.strerror or str(e)) from None

    def cut(self, written: int) -> None:
        """Remove the `written` bytes of a record that could not be finished from the end of the file."""
        try:
            end = os.lseek(self.fd, 0, os.SEEK_CUR)
            os.ftruncate(self.fd, end - written)
            os.lseek(self.fd, end - written, os.SEEK_SET)
        except OSError:
            pass  # the output stays as the system left it; the run ends with the write error either way


def record_text(as_json: bool, path: str, predictions=None, error=None) -> str:
    """One image's record: a strict-JSON line, or the path and a table of scores (or the error)."""
    if as_json:
        record = {"path": path, "predictions": predictions} if error is None else {"path": path, "error": error}
        return json.dumps(record, allow_nan=False)
    if error is not None:
        return f"{path}: error: {error}"
    width = max(len(p["label"]) for p in predictions)
    return "\n".join([path] + [f"  {p['score']:8.4f}  {p['label']:<{width}}" for p in predictions])


class Records:
    """Where a classify job's records go: predictions to standard output; errors to standard output as JSON
    lines, or to standard error as text. Around a progress bar on the terminal."""

    def __init__(self, as_json: bool, bar):
        self.as_json = as_json
        self.bar = bar
        self.out = RecordWriter(sys.stdout)

    def emit(self, path: str, predictions=None, error=None) -> None:
        text = record_text(self.as_json, path, predictions, error)
        to_stdout = self.as_json or error is None
        stream = sys.stdout if to_stdout else sys.stderr
        if self.bar.disable:
            self.write(to_stdout, text)
        else:
            with self.bar.external_write_mode(file=stream):
                self.write(to_stdout, text)

    def write(self, to_stdout: bool, text: str) -> None:
        if to_stdout:
            self.out.write(text)
        else:
            print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the job


def run_classify(job: ClassifyOptions) -> int:
    """Classify job.inputs with job.model here; 0, or 1 if an input failed, 2 if the model cannot load or
    the records cannot be written."""
    import numpy as np

    from .postprocess import check_finite
    from .preprocess import image_pixels, target_size
    from .startup import load_classifier

    if sys.stdout is None:  # started with standard output closed (`>&-`)
        print("vitnp: standard output is closed: nowhere to write the results", file=sys.stderr)
        return 2
    entries = scan_inputs(list(job.inputs))
    if not entries:
        print(no_images_message(job.inputs), file=sys.stderr)
        return 1
    clf = None
    if any(f.error is None for f in entries):
        try:
            clf = load_classifier(job.model, job.engine, revision=job.revision, token=job.token,
                                  cache_dir=job.cache_dir)
        except VitnpError as e:
            print(f"vitnp: {e}", file=sys.stderr)
            return 2

    show_progress = sys.stderr.isatty() and len(entries) >= PROGRESS_MIN_IMAGES
    failures = 0
    from tqdm.auto import tqdm

    with tqdm(total=len(entries), unit="img", disable=not show_progress, file=sys.stderr) as bar:
        try:
            records = Records(job.json, bar)
            if clf is not None:
                # One batch's pixel values, filled an image at a time: a full-size image lives only while it
                # is reduced to its row of this array.
                pixels = np.empty((min(job.batch_size, len(entries)), 3, *target_size(clf.processor)), np.float32)
            for start in range(0, len(entries), job.batch_size):
                chunk = entries[start:start + job.batch_size]
                good = []
                for found in chunk:
                    try:
                        if found.error is not None:
                            raise ImageError(found.error)
                        with open_regular_file(found.path) as f:
                            image_pixels(f, clf.processor, out=pixels[len(good)])
                        good.append(found.path)
                    except VitnpError as e:
                        failures += 1
                        records.emit(found.path, error=str(e))
                if good:
                    with np.errstate(all="ignore"):  # an overflow's non-finite score becomes an error record below
                        results = clf.postprocess(clf.logits(pixels[:len(good)]), top_k=job.top_k,
                                                  function_to_apply=job.function_to_apply)
                    for path, predictions in zip(good, results):
                        try:
                            records.emit(path, predictions=check_finite(predictions))
                        except NonFiniteScoresError as e:
                            failures += 1
                            records.emit(path, error=str(e))
                bar.update(len(chunk))
        except OutputError as e:
            print(f"vitnp: cannot write the results: {e}", file=sys.stderr)
            return 2
    if failures:
        print(f"vitnp: {failures} of {len(entries)} images failed", file=sys.stderr)
    return 1 if failures else 0
