"""Fuzzing the checkpoint reader and the config parser with mutated copies of small checkpoints.

1. Robustness: whatever the mutation (of the safetensors header, config.json or preprocessor_config.json),
   vitnp.load either succeeds or raises a VitnpError (never anything else), within a time bound (Hypothesis'
   deadline) and a memory bound (tracemalloc's peak); what loads computes finite logits, and with a mutated
   preprocessor config classifies a real image.
2. Differential: vitnp.checkpoint accepts exactly the files the reference `safetensors` library accepts and
   reads the same tensors (names, dtypes, shapes, bytes) from them, except where vitnp is deliberately
   stricter than the reference parser (see STRICTER).

Examples per test: --fuzz-examples N (default 100); e.g. `pytest tests/test_fuzz_checkpoint.py
--fuzz-examples 5000` for a long run.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import vitnp
from vitnp.checkpoint import DTYPE_BITS, VIEW_DTYPES, open_checkpoint

DIGITS = Path(vitnp.__file__).parent / "bundled" / "digits"
TIME_BOUND = timedelta(seconds=10)  # per example; the malformed files this guards against took 12-28 s
MEMORY_BOUND = 64 << 20             # peak bytes allocated per example (the checkpoints are < 1 MB)

# Where vitnp rejects what the reference parser accepts, and the error vitnp gives instead. Nothing else may
# differ. The reference reads JSON objects with serde: a repeated tensor name keeps the last entry, and a
# tensor entry written as an array is read as (dtype, shape, data_offsets) in order; the format specifies
# neither, and each makes one file mean different tensors to different readers.
STRICTER = {
    "repeated key": "appears twice in one object",
    "entry as array": "header entry must be an object",
}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture
def examples(request) -> int:
    return request.config.getoption("--fuzz-examples")


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=TIME_BOUND, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- building mutated safetensors files -----------------------------------------------------------------------

def small_checkpoint() -> tuple[dict, bytes]:
    """A few tensors of several dtypes, incl. a scalar and a zero-size one, in the format's layout."""
    rng = np.random.default_rng(0)
    arrays = [("w", "F32", rng.standard_normal((3, 4)).astype("<f4").tobytes(), [3, 4]),
              ("h", "F16", rng.standard_normal(5).astype("<f2").tobytes(), [5]),
              ("b", "BF16", rng.integers(0, 2**16, 4, dtype="<u2").tobytes(), [2, 2]),
              ("i", "I64", np.arange(2, dtype="<i8").tobytes(), [2]),
              ("s", "F32", np.float32(1.5).tobytes(), []),
              ("e", "U8", b"", [0]),
              ("q", "F8_E4M3", bytes(range(6)), [6])]
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, raw, shape in arrays:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def mutations(names: list[str]):
    """One mutation: (kind, arguments), applied by mutate()."""
    name = st.sampled_from(names)
    key = st.sampled_from(["dtype", "shape", "data_offsets"])
    small = st.integers(-3, 80)
    plausible = st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from([*DTYPE_BITS, "F31", "f32", ""])),
        st.tuples(st.just("shape"), st.lists(small, max_size=3)),
        st.tuples(st.just("shape"), st.lists(st.integers(0, 2**64 + 1), min_size=1, max_size=3)),
        st.tuples(st.just("data_offsets"), st.lists(small, min_size=0, max_size=3)),
    )
    return st.one_of(
        st.tuples(st.just("field"), name, plausible),
        st.tuples(st.just("field"), name, st.tuples(key, JSON)),
        st.tuples(st.just("shift"), name, st.integers(-8, 8), st.integers(-8, 8)),
        st.tuples(st.just("same bytes"), name, name),
        st.tuples(st.just("swap offsets"), name, name),
        st.tuples(st.just("drop field"), name, key),
        st.tuples(st.just("drop tensor"), name),
        st.tuples(st.just("extra field"), name, st.text(max_size=4), JSON),
        st.tuples(st.just("entry"), name, JSON),
        st.tuples(st.just("entry as array"), name),
        st.tuples(st.just("add tensor"), st.text(max_size=4), JSON),
        st.tuples(st.just("metadata"), JSON),
        st.tuples(st.just("root"), JSON),
        st.tuples(st.just("data length"), st.integers(-8, 8)),
        st.tuples(st.just("length prefix"), st.integers(-16, 16)),
        st.tuples(st.just("header byte"), st.integers(0, 10**6), st.integers(0, 255)),
        st.tuples(st.just("repeated key"), name),
    )


def mutate(header: dict, data: bytes, steps: list) -> bytes:
    """The file's bytes after applying the mutations in order."""
    header = json.loads(json.dumps(header))
    text_edits, data_delta, prefix_delta, repeat = [], 0, 0, None
    for kind, *args in steps:
        if not isinstance(header, dict) and kind not in ("root", "data length", "length prefix", "header byte"):
            continue
        info = header.get(args[0]) if isinstance(header, dict) and args and isinstance(args[0], str) else None
        if kind == "field" and isinstance(info, dict):
            info[args[1][0]] = args[1][1]
        elif kind == "shift" and isinstance(info, dict) and isinstance(info.get("data_offsets"), list) \
                and len(info["data_offsets"]) == 2 and all(isinstance(o, int) for o in info["data_offsets"]):
            info["data_offsets"] = [info["data_offsets"][0] + args[1], info["data_offsets"][1] + args[2]]
        elif kind in ("same bytes", "swap offsets") and isinstance(info, dict) \
                and isinstance(header.get(args[1]), dict):
            other = header[args[1]]
            if kind == "same bytes":
                info["data_offsets"] = other.get("data_offsets")
            else:
                info["data_offsets"], other["data_offsets"] = other.get("data_offsets"), info.get("data_offsets")
        elif kind == "drop field" and isinstance(info, dict):
            info.pop(args[1], None)
        elif kind == "drop tensor":
            header.pop(args[0], None)
        elif kind == "extra field" and isinstance(info, dict) and args[1] not in ("dtype", "shape", "data_offsets"):
            info[args[1]] = args[2]
        elif kind == "entry":
            header[args[0]] = args[1]
        elif kind == "entry as array" and isinstance(info, dict):
            header[args[0]] = [info.get("dtype"), info.get("shape"), info.get("data_offsets")]
        elif kind == "add tensor":
            header[args[0]] = args[1]
        elif kind == "metadata":
            header["__metadata__"] = args[0]
        elif kind == "root":
            header = args[0]
        elif kind == "data length":
            data_delta += args[0]
        elif kind == "length prefix":
            prefix_delta += args[0]
        elif kind == "header byte":
            text_edits.append((args[0], args[1]))
        elif kind == "repeated key" and isinstance(info, dict):
            repeat = args[0]
    text = json.dumps(header).encode()
    if repeat is not None and isinstance(header, dict) and repeat in header:
        # The same tensor name twice: first an entry that the reference overwrites, then the real one.
        text = text[:1] + json.dumps(repeat).encode() + b': {"dtype": "U8", "shape": [0], ' \
            b'"data_offsets": [0, 0]}, ' + text[1:]
    text = bytearray(text)
    for position, byte in text_edits:
        if text:
            text[position % len(text)] = byte
    data = data + b"\x7f" * data_delta if data_delta >= 0 else data[:max(0, len(data) + data_delta)]
    return struct.pack("<Q", max(0, len(text) + prefix_delta)) + bytes(text) + data


def reference_read(raw: bytes):
    """The reference library's tensors {name: (dtype, shape, bytes)}, or the error it raised."""
    from safetensors import deserialize

    try:
        return {name: (info["dtype"], tuple(info["shape"]), bytes(info["data"])) for name, info in deserialize(raw)}
    except Exception as e:  # the reference raises SafetensorError / plain exceptions
        return e


def vitnp_read(model_dir: Path, raw: bytes):
    path = model_dir / "model.safetensors"
    path.unlink(missing_ok=True)  # a new file: views of earlier examples keep their own mapping
    path.write_bytes(raw)
    try:
        tensors = open_checkpoint(model_dir)
    except vitnp.CheckpointError as e:
        return e
    out = {}
    for name, f in tensors.items():
        dtype, shape, offset, nbytes = f.entries[name]
        data = raw[offset:offset + nbytes]
        if dtype in VIEW_DTYPES:
            assert f.view(name).tobytes() == data
        out[name] = (dtype, shape, data)
    return out


@pytest.mark.parametrize("base", ["small", "digits"])
def test_vitnp_reads_exactly_what_safetensors_reads(base, tmp_path, examples):
    header, data = small_checkpoint() if base == "small" else header_of(DIGITS / "model.safetensors")
    names = [n for n in header if n != "__metadata__"]
    seen = set()

    @fuzz_settings(examples)
    @given(steps=st.lists(mutations(names if base == "small" else names[:6] + names[-6:]), min_size=1, max_size=3))
    def check(steps):
        raw = mutate(header, data, steps)
        tracemalloc.start()
        try:
            ours = vitnp_read(tmp_path, raw)
            assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
        finally:
            tracemalloc.stop()
        reference = reference_read(raw)
        ours_ok, reference_ok = isinstance(ours, dict), isinstance(reference, dict)
        seen.add((ours_ok, reference_ok))
        if reference_ok and not ours_ok:
            stricter = [k for k, *_ in steps if k in STRICTER]
            assert stricter and any(STRICTER[k] in str(ours) for k in stricter), \
                f"vitnp rejects a file safetensors accepts: {ours}"
        elif ours_ok and not reference_ok:
            raise AssertionError(f"vitnp accepts a file safetensors rejects ({reference})")
        elif ours_ok:
            assert ours == reference

    check()
    assert (False, False) in seen  # the mutations do produce malformed files ...
    if examples >= 50:
        assert (True, True) in seen  # ... and valid ones


def test_unmutated_files_are_read_alike(tmp_path):
    """The differential test's baseline: both readers agree on the intact files."""
    for header, data in (small_checkpoint(), header_of(DIGITS / "model.safetensors")):
        raw = mutate(header, data, [])
        ours, reference = vitnp_read(tmp_path, raw), reference_read(raw)
        assert isinstance(ours, dict) and ours == reference


@pytest.mark.parametrize("kind", STRICTER)
def test_where_vitnp_is_stricter(kind, tmp_path):
    header, data = small_checkpoint()
    raw = mutate(header, data, [(kind, "w")])
    assert isinstance(reference_read(raw), dict)
    ours = vitnp_read(tmp_path, raw)
    assert isinstance(ours, vitnp.CheckpointError) and STRICTER[kind] in str(ours)


# ---- the load path: loads, or one VitnpError ----------------------------------------------------------------------

def load(model_dir: Path):
    """vitnp.load, the whole way: config, preprocessor config, header, config claims vs header shapes, tensor
    validation, every tensor read and checked for non-finite values, layers built. Backend numba: the same
    kernels every time, nothing timed."""
    return vitnp.load(model_dir, progress=False, backend="numba")


@pytest.fixture
def digits_copy(tmp_path) -> Path:
    """A copy of the digits model, loaded once first so the kernels are in place before the bounds apply."""
    load(DIGITS)
    return Path(shutil.copytree(DIGITS, tmp_path / "m"))


def bounded_load(model_dir: Path):
    """load(model_dir) -> (classifier or None, error type name or "loaded"); within MEMORY_BOUND, and raising
    nothing but a VitnpError."""
    tracemalloc.start()
    try:
        clf = load(model_dir)
        outcome = "loaded"
    except vitnp.VitnpError as e:
        clf, outcome = None, type(e).__name__
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND
    return clf, outcome


def test_mutated_headers_load_or_raise_a_vitnp_error(digits_copy, examples):
    header, data = header_of(DIGITS / "model.safetensors")
    names = [n for n in header if n != "__metadata__"]
    outcomes = set()

    @fuzz_settings(examples)
    @given(steps=st.lists(mutations(names), min_size=1, max_size=3))
    def check(steps):
        path = digits_copy / "model.safetensors"
        path.unlink()
        path.write_bytes(mutate(header, data, steps))
        outcomes.add(bounded_load(digits_copy)[1])

    check()
    assert "CheckpointError" in outcomes


CONFIG_FIELDS = ["architectures", "model_type", "image_size", "patch_size", "num_channels", "hidden_size",
                 "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act", "layer_norm_eps",
                 "qkv_bias", "id2label", "num_labels", "problem_type"]


def config_mutations():
    field = st.sampled_from(CONFIG_FIELDS)
    plausible = st.one_of(st.integers(-2, 300), st.integers(0, 10**12), st.sampled_from(
        [1e-12, 1e-6, 0.0, -1.0, float("nan"), float("inf"), 1e300, "gelu", "relu", True, False, None, [],
         ["ViTForImageClassification"], ["DeiTForImageClassification"], [["ViTForImageClassification"]],
         {"0": "a"}, {str(i): str(i) for i in range(10)}, {str(i): i for i in range(10)}, "vit", "deit"]))
    return st.one_of(
        st.tuples(st.just("set"), field, plausible),
        st.tuples(st.just("set"), field, JSON),
        st.tuples(st.just("drop"), field),
        st.tuples(st.just("root"), JSON),
    )


def mutated(original: dict, steps) -> object:
    """The JSON document after the steps: ("root", value) replaces it, ("set", key, value) and ("drop", key)
    change an object's fields."""
    d = dict(original)
    for kind, *args in steps:
        if kind == "root":
            d = args[0]
        elif isinstance(d, dict) and kind == "set":
            d[args[0]] = args[1]
        elif isinstance(d, dict) and kind == "drop":
            d.pop(args[0], None)
    return d


def test_mutated_configs_load_or_raise_a_vitnp_error(digits_copy, examples):
    """An accepted config gives a classifier whose forward pass has finite logits."""
    original = json.loads((DIGITS / "config.json").read_text())
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    outcomes = set()

    @fuzz_settings(max(10, examples // 2))
    @given(steps=st.lists(config_mutations(), min_size=1, max_size=3))
    def check(steps):
        d = mutated(original, steps)
        (digits_copy / "config.json").write_text(json.dumps(d))
        clf, outcome = bounded_load(digits_copy)
        outcomes.add(outcome)
        if clf is not None:
            assert np.isfinite(clf.logits(x)).all()

    check()
    assert "ConfigError" in outcomes


PROCESSOR_FIELDS = ["image_processor_type", "feature_extractor_type", "do_resize", "size", "resample",
                    "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                    "image_std"]


def processor_mutations():
    field = st.sampled_from(PROCESSOR_FIELDS)
    side = st.one_of(st.integers(-2, 40), st.integers(0, 10**6), st.floats())
    plausible = st.one_of(
        side, st.booleans(), st.none(),
        st.fixed_dictionaries({"height": side, "width": side}),
        st.fixed_dictionaries({"shortest_edge": side}),
        st.lists(side, max_size=3),
        st.lists(st.floats(), min_size=3, max_size=3),
        st.sampled_from(["ViTImageProcessor", "DeiTImageProcessor", "ViTFeatureExtractor", "CLIPImageProcessor",
                         1e-300, 1e300, float("nan"), float("inf"), 0.0, -1.0]))
    return st.one_of(
        st.tuples(st.just("set"), field, plausible),
        st.tuples(st.just("set"), field, JSON),
        st.tuples(st.just("drop"), field),
        st.tuples(st.just("root"), JSON),
    )


def test_mutated_preprocessor_configs_load_or_raise_a_vitnp_error(digits_copy, examples, examples_dir):
    """An accepted preprocessor config classifies a real image: finite scores, or one VitnpError."""
    original = json.loads((DIGITS / "preprocessor_config.json").read_text())
    image = examples_dir / "digits" / "digit-3-idx0705.png"
    outcomes = set()

    @fuzz_settings(max(10, examples // 2))
    @given(steps=st.lists(processor_mutations(), min_size=1, max_size=3))
    # Pixel values near 1e38: the activations overflow to inf and NaN, which every kernel passes on to the scores check
    @example(steps=[("set", "rescale_factor", 6.672203074112425e+35)])
    def check(steps):
        d = mutated(original, steps)
        (digits_copy / "preprocessor_config.json").write_text(json.dumps(d))
        clf, outcome = bounded_load(digits_copy)
        outcomes.add(outcome)
        if clf is not None:
            tracemalloc.start()
            try:
                scores = [p["score"] for p in clf.classify(image)]
            except vitnp.VitnpError as e:
                outcomes.add(type(e).__name__)
                return
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            assert peak < MEMORY_BOUND
            assert np.isfinite(scores).all()

    check()
    assert "ConfigError" in outcomes
    if examples >= 50:
        assert "loaded" in outcomes
