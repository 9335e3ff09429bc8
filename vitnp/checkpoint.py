"""model.safetensors (or a sharded checkpoint) -> validated, zero-copy tensor views.

Checkpoints come from anyone, so the header is checked as the safetensors format specifies before any byte of
tensor data is read: the header is a JSON object of objects; each tensor has a known dtype, a shape of
non-negative integers and `data_offsets` of two non-negative integers whose span is exactly shape x dtype size;
and the tensors' byte ranges, in order, cover the data buffer exactly, with no overlap and no hole (so no byte
is read as two tensors and no other content hides between them). Every violation is one CheckpointError naming
the file, the tensor and the rule.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# The reference implementation's limit on the header's length.
MAX_HEADER_BYTES = 100_000_000
# The safetensors spec's dtypes with their size in bits (the sub-byte ones only in whole bytes).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# How view() presents each dtype: bfloat16 and the 8-bit floats as their raw bits (numpy has no such types).
VIEW_DTYPES = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype("u1"), "F8_E4M3": np.dtype("u1"), "F8_E8M0": np.dtype("u1"),
    "F8_E4M3FNUZ": np.dtype("u1"), "F8_E5M2FNUZ": np.dtype("u1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}
_USIZE_END = 1 << 64  # shapes and offsets are u64 in the format

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_POPULATE_MIN_BYTES = 1 << 20


def _is_size(value) -> bool:
    """A JSON integer the format can hold as an unsigned 64-bit size."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _USIZE_END


def _is_unicode(strings: list[str]) -> bool:
    """JSON escapes can spell lone UTF-16 surrogates, which are no Unicode text (the reference parser refuses
    them)."""
    try:
        "".join(strings).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reject_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        seen = set()
        duplicate = next(k for k in keys if k in seen or seen.add(k))
        raise _HeaderJSONError(f"the key {duplicate!r} appears twice in one object")
    return dict(pairs)


def _reject_constant(name: str):
    raise _HeaderJSONError(f"{name} is not JSON")


class _HeaderJSONError(ValueError):
    pass


def _parse_json(text: str):
    # "-0" parses as a float so that the size rules reject it, as the reference parser does.
    return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
                      parse_int=lambda s: -0.0 if s == "-0" else int(s))


def parse_header(header: bytes, file_size: int, where) -> dict[str, tuple[str, tuple, int, int]]:
    """The validated header of a safetensors file: tensor name -> (dtype, shape, absolute offset, nbytes).

    header: the JSON bytes after the 8-byte length; file_size: the whole file's size in bytes."""
    n = len(header)
    try:
        root = _parse_json(header.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not a safetensors file (header is not UTF-8 text)") from None
    except _HeaderJSONError as e:
        raise CheckpointError(f"{where}: not a safetensors file (header: {e})") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: not a safetensors file (unreadable header: not JSON)") from None
    if not isinstance(root, dict):
        kind = {list: "array", str: "string", type(None): "null", bool: "boolean"}.get(type(root), "number")
        raise CheckpointError(f"{where}: not a safetensors file (header is a JSON {kind}, not an object)")
    metadata = root.pop("__metadata__", None)  # null: no metadata, as the reference parser reads it
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{where}: '__metadata__' must be an object of strings")
    if not _is_unicode([*root, *(metadata or {}), *(metadata or {}).values()]):
        raise CheckpointError(f"{where}: not a safetensors file (header holds an unpaired surrogate escape)")

    spans = []  # (begin, end, name)
    entries = {}
    for name, info in root.items():
        def bad(rule: str):
            return CheckpointError(f"{where}: tensor {name!r}: {rule}")

        if not isinstance(info, dict):
            raise bad(f"header entry must be an object with dtype, shape, data_offsets; got {info!r:.80}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise bad(f"header entry has no {key!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(f"unknown dtype {dtype!r:.80}; safetensors dtypes: {', '.join(DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise bad(f"shape {shape!r:.80} must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
            raise bad(f"data_offsets {offsets!r:.80} must be two non-negative integers [begin, end]")
        begin, end = offsets
        if begin > end:
            raise bad(f"data_offsets {offsets} begin after they end")
        count = 1
        for d in shape:  # left to right, as the reference parser, which fails on the first overflow
            count *= d
            if count >= _USIZE_END:
                raise bad(f"shape {shape} has more elements than a 64-bit size holds")
        bits = count * DTYPE_BITS[dtype]
        if bits % 8:
            raise bad(f"shape {shape} of {dtype} is not a whole number of bytes")
        if end - begin != bits // 8:
            raise bad(f"data_offsets {offsets} span {end - begin} bytes but shape {shape} of {dtype} "
                      f"takes {bits // 8}")
        spans.append((begin, end, name))
        entries[name] = (dtype, tuple(shape), 8 + n + begin, end - begin)

    # The tensors tile the data buffer: sorted by offsets, each begins where the previous one ends.
    data_bytes = file_size - 8 - n
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            rule = (f"overlaps tensor {previous!r} (data_offsets [{begin}, {end}] begin before {position})"
                    if begin < position else
                    f"leaves bytes {position}..{begin} of the data buffer unused before it (a hole)")
            raise CheckpointError(f"{where}: tensor {name!r}: {rule}; tensors must cover the data buffer "
                                  "exactly, in order")
        position, previous = end, name
    if position > data_bytes:
        raise CheckpointError(f"{where}: tensor {previous!r} lies beyond the end of the file (truncated download? "
                              f"the data buffer holds {data_bytes} bytes, the tensors {position})")
    if position < data_bytes:
        raise CheckpointError(f"{where}: {data_bytes - position} bytes after the last tensor are not part of "
                              "any tensor; tensors must cover the data buffer exactly")
    return entries


class TensorFile:
    """Zero-copy read-only views on one validated .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                f.seek(0)
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds "
                                          f"{MAX_HEADER_BYTES})")
                if 8 + n > size:
                    raise CheckpointError(f"{path}: header length {n} lies beyond the end of the file "
                                          "(truncated download?)")
                header = f.read(n)
                self.entries = parse_header(header, size, path)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: weights file not found") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the weights file: {e.strerror or e}") from None
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)

    def view(self, name: str) -> np.ndarray:
        dtype, shape, offset, nbytes = self.entries[name]
        if dtype not in VIEW_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, which has no array view")
        if nbytes >= _POPULATE_MIN_BYTES:
            # Map the tensor's pages in one call instead of one page fault per 4 KiB as the copy walks it
            # (ViT-B: ~85k faults, two thirds of the load time); only this tensor's, so the peak stays low.
            start = offset - offset % mmap.PAGESIZE
            try:
                self._mmap.madvise(_MADV_POPULATE_READ, start, offset + nbytes - start)
            except OSError:  # kernels before 5.14: faults as usual
                pass
        return self._bytes[offset:offset + nbytes].view(VIEW_DTYPES[dtype]).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache): it has been copied."""
        _, _, offset, nbytes = self.entries[name]
        start = offset - offset % mmap.PAGESIZE
        if nbytes:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)


def _shard_name_problem(shard) -> str | None:
    if not isinstance(shard, str):
        return f"shard name {shard!r:.80} must be a string"
    if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\x00" in shard or Path(shard).name != shard:
        return f"shard name {shard!r:.80} must be a file name in the model directory"
    return None


def open_checkpoint(model_dir: Path) -> dict[str, TensorFile]:
    """tensor name -> the file holding it, over a single file or a sharded checkpoint."""
    model_dir = Path(model_dir)
    single, index = model_dir / SAFETENSORS, model_dir / SAFETENSORS_INDEX
    if single.is_file():
        f = TensorFile(single)
        return {name: f for name in f.entries}
    if index.is_file():
        try:
            weight_map = _parse_json(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise CheckpointError(f"{index}: malformed index (expected a JSON object with a 'weight_map')") from None
        except OSError as e:
            raise CheckpointError(f"{index}: cannot read the index: {e.strerror or e}") from None
        files, tensors = {}, {}
        for name, shard in weight_map.items():
            if shard not in files:
                problem = _shard_name_problem(shard)
                if problem:
                    raise CheckpointError(f"{index}: {problem}")
                files[shard] = TensorFile(model_dir / shard)
            if name not in files[shard].entries:
                raise CheckpointError(f"{index}: tensor {name!r} is listed in {shard} but that file does not hold it")
            tensors[name] = files[shard]
        return tensors
    if (model_dir / "pytorch_model.bin").exists():
        raise CheckpointError(
            f"{model_dir}: only pytorch_model.bin is present; vitnp reads safetensors only "
            "(convert with transformers: model.save_pretrained(dir) writes model.safetensors)"
        )
    raise CheckpointError(f"{model_dir}: no {SAFETENSORS} or {SAFETENSORS_INDEX} found")


def check_finite(name: str, array: np.ndarray, where) -> None:
    """CheckpointError unless every value of the float tensor is finite (no NaN may ever reach a score)."""
    # One read of the array and no temporary: a sum of squares (BLAS dot, the fastest pass numpy has) or a
    # sum is finite only if every term is. A non-finite result may also be an overflow of large finite values,
    # which the exact (allocating) test below tells apart.
    with np.errstate(over="ignore", invalid="ignore"):
        if array.dtype in (np.float32, np.float64) and array.flags.c_contiguous:
            flat = array.reshape(-1)
            total = float(np.dot(flat, flat))
        else:
            total = float(np.add.reduce(array, axis=None, dtype=np.float32 if array.dtype.itemsize < 4 else None))
    if math.isfinite(total):
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(np.size(finite) - np.count_nonzero(finite))
        first = np.unravel_index(int(np.argmin(finite)), array.shape) if array.ndim else ()
        value = array[first] if array.ndim else array[()]
        raise CheckpointError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) "
                              f"(first: {float(value)} at index {list(map(int, first))}); "
                              "the checkpoint is corrupt")
