"""Untrusted checkpoints: every malformed model.safetensors / config.json ends in one clear VitnpError.

Each test patches one field of a copy of the bundled digits model (as a hostile user would) and checks the
error names the file, the tensor or field, and the rule. The safetensors rules are checked through
vitnp.checkpoint.open_checkpoint, the config rules through vitnp.config (load_config, check_against_tensors).
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

import vitnp
from vitnp.checkpoint import DTYPE_BITS, check_finite, open_checkpoint, parse_header
from vitnp.config import ViTConfig, check_against_tensors, load_config

DIGITS = Path(vitnp.__file__).parent / "bundled" / "digits"


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_safetensors(path: Path, header, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture
def digits(tmp_path) -> Path:
    return Path(shutil.copytree(DIGITS, tmp_path / "digits"))


def patch_header(model_dir: Path, edit) -> Path:
    path = model_dir / "model.safetensors"
    header, data = read_safetensors(path)
    result = edit(header)
    write_safetensors(path, header if result is None else result, data)
    return path


def patch_config(model_dir: Path, **changes) -> Path:
    path = model_dir / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    return path


def entry(name: str, **changes):
    def edit(header):
        header[name].update(changes)
    return edit


def shapes_of(model_dir: Path) -> dict:
    return {name: f.entries[name][1] for name, f in open_checkpoint(model_dir).items()}


# ---- valid checkpoints read exactly as the reference library reads them ------------------------------------

@pytest.mark.parametrize("model", ["digits", "tiny_vit", "tiny_deit_distilled"])
def test_valid_checkpoints_read_as_safetensors_reads_them(model, request):
    from safetensors.numpy import load_file

    model_dir = DIGITS if model == "digits" else request.getfixturevalue(model)
    tensors = open_checkpoint(model_dir)
    reference = load_file(model_dir / "model.safetensors")
    assert sorted(tensors) == sorted(reference)
    for name, expected in reference.items():
        view = tensors[name].view(name)
        assert not view.flags.writeable
        assert view.dtype == expected.dtype and view.shape == expected.shape
        np.testing.assert_array_equal(view, expected)
        tensors[name].release(name)
        np.testing.assert_array_equal(tensors[name].view(name), expected)  # released pages read back


def test_bf16_and_f16_checkpoints(tmp_path):
    from checkpoints import make_checkpoint
    from safetensors import deserialize

    for dtype, name in (("bfloat16", "BF16"), ("float16", "F16")):
        model_dir = make_checkpoint(tmp_path / dtype, "vit", "tiny", num_labels=3, dtype=dtype)
        tensors = open_checkpoint(model_dir)
        for tensor, info in deserialize((model_dir / "model.safetensors").read_bytes()):
            assert tensors[tensor].entries[tensor][0] == info["dtype"] == name
            assert tensors[tensor].view(tensor).tobytes() == bytes(info["data"])


def make_sharded(model_dir: Path, index=None) -> Path:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:30], "model-00002-of-00002.safetensors": names[30:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, model_dir / shard)
    (model_dir / "model.safetensors").unlink()
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps(index if index is not None else {"metadata": {}, "weight_map": weight_map}))
    return model_dir


def test_sharded_checkpoint(digits):
    from safetensors.numpy import load_file

    reference = load_file(digits / "model.safetensors")
    tensors = open_checkpoint(make_sharded(digits))
    assert sorted(tensors) == sorted(reference)
    assert len({f.path for f in tensors.values()}) == 2
    for name in reference:
        np.testing.assert_array_equal(tensors[name].view(name), reference[name])


@pytest.mark.parametrize("shard,message", [
    ("../model.safetensors", "must be a file name in the model directory"),
    ("..", "must be a file name in the model directory"),
    ("", "must be a file name in the model directory"),
    ("sub\\x.safetensors", "must be a file name in the model directory"),
    (7, "shard name 7 must be a string"),
    ("absent.safetensors", "absent.safetensors: weights file not found"),
    ("sub", "sub: not a regular file"),
])
def test_shard_names_are_plain_file_names(digits, shard, message):
    (digits / "sub").mkdir()
    make_sharded(digits, index={"weight_map": {"classifier.bias": shard}})
    with pytest.raises(vitnp.CheckpointError, match=message):
        open_checkpoint(digits)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": "x"}, {"metadata": {}}])
def test_malformed_index(digits, index):
    make_sharded(digits, index=index)
    with pytest.raises(vitnp.CheckpointError, match="malformed index"):
        open_checkpoint(digits)


def test_index_tensor_in_the_wrong_shard(digits):
    make_sharded(digits, index={"weight_map": {"vit.layernorm.bias": "model-00001-of-00002.safetensors"}})
    with pytest.raises(vitnp.CheckpointError, match="'vit.layernorm.bias' is listed in model-00001-of-00002"):
        open_checkpoint(digits)


def test_pytorch_bin_hint(digits):
    (digits / "model.safetensors").rename(digits / "pytorch_model.bin")
    with pytest.raises(vitnp.CheckpointError, match="only pytorch_model.bin is present"):
        open_checkpoint(digits)


# ---- the issue's rows: safetensors header ------------------------------------------------------------------

@pytest.mark.parametrize("root,kind", [([1, 2], "array"), ("weights", "string"), (3, "number"), (None, "null"),
                                       (True, "boolean")])
def test_header_must_be_an_object(digits, root, kind):
    path = patch_header(digits, lambda h: json.dumps(root).encode())
    with pytest.raises(vitnp.CheckpointError, match=f"{path}: not a safetensors file \\(header is a JSON {kind}"):
        open_checkpoint(digits)


@pytest.mark.parametrize("changes,rule", [
    ({"data_offsets": ["0", "40"]}, r"data_offsets \['0', '40'\] must be two non-negative integers"),
    ({"data_offsets": [0.0, 40.0]}, r"data_offsets \[0.0, 40.0\] must be two non-negative integers"),
    ({"data_offsets": [0, 40, 80]}, r"data_offsets \[0, 40, 80\] must be two non-negative integers"),
    ({"data_offsets": [True, 40]}, r"data_offsets \[True, 40\] must be two non-negative integers"),
    ({"data_offsets": [-48, -8]}, r"data_offsets \[-48, -8\] must be two non-negative integers"),
    ({"data_offsets": [40, 0]}, r"data_offsets \[40, 0\] begin after they end"),
    ({"dtype": ["F32"]}, r"unknown dtype \['F32'\]"),
    ({"dtype": "F31"}, r"unknown dtype 'F31'; safetensors dtypes: BOOL, F4"),
    ({"shape": [10.0]}, r"shape \[10.0\] must be a list of non-negative integers"),
    ({"shape": [-10]}, r"shape \[-10\] must be a list of non-negative integers"),
    ({"shape": 10}, r"shape 10 must be a list of non-negative integers"),
    ({"shape": [11]}, r"data_offsets \[0, 40\] span 40 bytes but shape \[11\] of F32 takes 44"),
    ({"dtype": "F16"}, r"data_offsets \[0, 40\] span 40 bytes but shape \[10\] of F16 takes 20"),
    ({"dtype": "F4", "shape": [5]}, r"shape \[5\] of F4 is not a whole number of bytes"),
])
def test_tensor_entry_rules(digits, changes, rule):
    path = patch_header(digits, entry("classifier.bias", **changes))
    with pytest.raises(vitnp.CheckpointError, match=f"{path}: tensor 'classifier.bias': {rule}"):
        open_checkpoint(digits)


@pytest.mark.parametrize("info", [["F32", [10], [0, 40]], "F32", None])
def test_tensor_entry_must_be_an_object(digits, info):
    patch_header(digits, lambda h: h.update({"classifier.bias": info}))
    with pytest.raises(vitnp.CheckpointError, match="tensor 'classifier.bias': header entry must be an object"):
        open_checkpoint(digits)


@pytest.mark.parametrize("key", ["dtype", "shape", "data_offsets"])
def test_tensor_entry_fields_required(digits, key):
    patch_header(digits, lambda h: h["classifier.bias"].pop(key) and None)
    with pytest.raises(vitnp.CheckpointError, match=f"tensor 'classifier.bias': header entry has no '{key}'"):
        open_checkpoint(digits)


def test_negative_offsets_never_read_the_header_as_a_tensor(digits):
    """[-48, -8] once pointed into the header text and was read as classifier.bias."""
    patch_header(digits, entry("classifier.bias", data_offsets=[-48, -8]))
    with pytest.raises(vitnp.CheckpointError, match="'classifier.bias': data_offsets \\[-48, -8\\]"):
        open_checkpoint(digits)


def test_two_tensors_on_the_same_bytes(digits):
    def edit(h):
        h["vit.layernorm.weight"]["data_offsets"] = h["vit.layernorm.bias"]["data_offsets"]

    patch_header(digits, edit)
    with pytest.raises(vitnp.CheckpointError,
                       match="tensor 'vit.layernorm.(bias|weight)': overlaps tensor 'vit.layernorm.(bias|weight)'"):
        open_checkpoint(digits)


def test_hole_between_tensors(digits):
    """Bytes no tensor owns are where a polyglot file hides its other content."""
    path = digits / "model.safetensors"
    header, data = read_safetensors(path)
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= 40:
            info["data_offsets"] = [o + 16 for o in info["data_offsets"]]
    write_safetensors(path, header, data[:40] + b"<html>polyglot!" + b"\0" + data[40:])
    with pytest.raises(vitnp.CheckpointError, match="tensor 'classifier.weight': leaves bytes 40..56 of the data "
                                                    "buffer unused before it \\(a hole\\)"):
        open_checkpoint(digits)


def test_bytes_after_the_last_tensor(digits):
    path = digits / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"PK\x03\x04 zip appended")
    with pytest.raises(vitnp.CheckpointError, match="17 bytes after the last tensor are not part of any tensor"):
        open_checkpoint(digits)


def test_truncated_file(digits):
    path = digits / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(vitnp.CheckpointError, match="tensor 'vit.layernorm.weight' lies beyond the end of the file"):
        open_checkpoint(digits)


@pytest.mark.parametrize("prefix,message", [
    (struct.pack("<Q", 100_000_001), "header length 100000001 exceeds 100000000"),
    (struct.pack("<Q", 2**64 - 1), "header length 18446744073709551615 exceeds"),
    (struct.pack("<Q", 10_000_000), "header length 10000000 lies beyond the end of the file"),
    (b"\x05", "too short"),
])
def test_header_length(digits, prefix, message):
    (digits / "model.safetensors").write_bytes(prefix)
    with pytest.raises(vitnp.CheckpointError, match=message):
        open_checkpoint(digits)


@pytest.mark.parametrize("text,message", [
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {}}', "the key 'a' appears twice"),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "dtype": "U8"}}', "the key 'dtype' appears twice"),
    (b'{"a": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}', "NaN is not JSON"),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [-0, 1]}}', r"data_offsets \[-0.0, 1\]"),
    (b'{"\xff": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', "header is not UTF-8 text"),
    (b'{"a\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', "unpaired surrogate"),
    (b'[' * 100_000 + b']' * 100_000, "unreadable header"),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}', "unreadable header"),
    (b'{"__metadata__": {"format": 1}}', "'__metadata__' must be an object of strings"),
    (b'{"__metadata__": ["pt"]}', "'__metadata__' must be an object of strings"),
])
def test_header_json(digits, text, message):
    write_safetensors(digits / "model.safetensors", text, b"\1")
    with pytest.raises(vitnp.CheckpointError, match=message):
        open_checkpoint(digits)


def test_what_the_format_allows_is_read(tmp_path):
    """Zero-size tensors (several on one offset), scalars, null metadata, padding whitespace, every dtype."""
    header = {"__metadata__": None, "empty1": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
              "empty2": {"dtype": "I8", "shape": [0], "data_offsets": [0, 0]},
              "scalar": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}
    position = 4
    for dtype, bits in DTYPE_BITS.items():
        header[dtype] = {"dtype": dtype, "shape": [2, 4], "data_offsets": [position, position + bits]}
        position += bits
    data = np.arange(position, dtype=np.uint8).tobytes()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, json.dumps(header).encode() + b"   ", data)
    tensors = open_checkpoint(tmp_path)
    assert tensors["empty1"].view("empty1").shape == (0, 3)
    assert tensors["scalar"].view("scalar").tobytes() == data[:4]
    assert tensors["F16"].view("F16").tobytes() == data[header["F16"]["data_offsets"][0]:][:16]
    assert tensors["F4"].entries["F4"][3] == 4
    with pytest.raises(vitnp.CheckpointError, match="'F4' has dtype F4, which has no array view"):
        tensors["F4"].view("F4")


def test_parse_header_is_the_file_rule(digits):
    header, data = read_safetensors(digits / "model.safetensors")
    text = json.dumps(header).encode()
    entries = parse_header(text, 8 + len(text) + len(data), "x")
    assert entries["classifier.bias"] == ("F32", (10,), 8 + len(text), 40)


# ---- non-finite weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_check_finite_names_the_tensor(bad, dtype):
    a = np.ones((3, 5), dtype)
    a[2, 1] = bad
    with pytest.raises(vitnp.CheckpointError, match=f"where: tensor 'w' holds 1 non-finite value\\(s\\) "
                                                    f"\\(first: {float(bad)} at index \\[2, 1\\]\\)"):
        check_finite("w", a, "where")


def unaligned(a: np.ndarray) -> np.ndarray:
    out = np.frombuffer(b"\0" + a.tobytes(), np.uint8)[1:].view(a.dtype).reshape(a.shape)
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("layout", [lambda a: a[:, ::2], lambda a: a.astype(np.float64), unaligned],
                         ids=["strided", "float64", "unaligned"])
def test_check_finite_any_layout(layout):
    a = np.ones((4, 6), np.float32)
    check_finite("w", layout(a), "where")
    a[1, 4] = np.nan
    with pytest.raises(vitnp.CheckpointError, match="'w' holds 1 non-finite value\\(s\\) \\(first: nan at index "):
        check_finite("w", layout(a), "where")


def test_check_finite_accepts_large_finite_values():
    """Their sum overflows to inf; every value is still finite."""
    a = np.full(8, np.finfo(np.float32).max, np.float32)
    check_finite("w", a, "where")
    check_finite("h", np.full(8, 65504, np.float16), "where")
    check_finite("empty", np.zeros((0, 4), np.float32), "where")


def nan_weights(model_dir: Path, name="vit.encoder.layer.2.output.dense.weight"):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    tensors[name] = tensors[name].copy()
    tensors[name][3, 7] = np.nan
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_nan_weight_found_by_check_finite(digits):
    nan_weights(digits)
    tensors = open_checkpoint(digits)
    bad = [n for n in tensors if not np.isfinite(tensors[n].view(n)).all()]
    assert bad == ["vit.encoder.layer.2.output.dense.weight"]
    with pytest.raises(vitnp.CheckpointError, match="'vit.encoder.layer.2.output.dense.weight' holds 1 non-finite"):
        for n in tensors:
            check_finite(n, tensors[n].view(n), digits)


# ---- the issue's rows: config.json --------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    ({"architectures": 5}, "'architectures' must be a list of class names, got 5"),
    ({"architectures": [["ViTForImageClassification"]]}, "'architectures' must be a list of class names"),
    ({"model_type": ["vit"]}, "'model_type' must be a string"),
    ({"num_labels": 10**9, "id2label": None}, "'num_labels' must be an integer in 1..100000, got 1000000000"),
    ({"num_labels": 1e9, "id2label": None}, "'num_labels' must be an integer in 1..100000, got 1000000000.0"),
    ({"num_labels": "10"}, "'num_labels' must be an integer in 1..100000, got '10'"),
    ({"num_hidden_layers": 10**6}, "'num_hidden_layers' is 1000000, above the largest vitnp accepts"),
    ({"hidden_size": 10**9}, "'hidden_size' is 1000000000, above the largest"),
    ({"image_size": 3.5}, "'image_size' must be a positive integer, got 3.5"),
    ({"layer_norm_eps": float("nan")}, "'layer_norm_eps' must be a finite number in \\(0, 1\\], got nan"),
    ({"layer_norm_eps": float("inf")}, "'layer_norm_eps' must be a finite number in \\(0, 1\\], got inf"),
    ({"layer_norm_eps": "1e-12"}, "'layer_norm_eps' must be a finite number"),
    ({"qkv_bias": "yes"}, "'qkv_bias' must be true or false"),
    ({"hidden_act": ["gelu"]}, "unsupported hidden_act \\['gelu'\\]"),
    ({"problem_type": {"a": 1}}, "unknown problem_type"),
    ({"id2label": {"0": "a", "00": "b"}}, "'id2label' keys must be integers"),
    ({"id2label": {"0": "a", "1": 2}}, "'id2label' labels must be strings, got 2"),
    ({"id2label": [0, 1]}, "'id2label' must be a non-empty object"),
])
def test_config_rows(digits, changes, message):
    """Each fails in config parsing, before any tensor is read or any size is allocated."""
    path = patch_config(digits, **changes)
    with pytest.raises(vitnp.ConfigError, match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)
    with pytest.raises(vitnp.ConfigError, match=message):
        vitnp.load(digits)


@pytest.mark.parametrize("text", ['{"layer_norm_eps": NaN}', '{"layer_norm_eps": Infinity}',
                                  '{"layer_norm_eps": -Infinity}', '{"layer_norm_eps": 1e999}'])
def test_config_non_finite_literals(digits, text):
    d = json.loads((digits / "config.json").read_text())
    d.pop("layer_norm_eps")
    (digits / "config.json").write_text(json.dumps(d)[:-1] + ", " + text[1:])
    with pytest.raises(vitnp.ConfigError, match="'layer_norm_eps' must be a finite number"):
        vitnp.load(digits)


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 1000}, "'num_hidden_layers' is 1000 but the checkpoint holds 4 encoder layer"),
    ({"num_hidden_layers": 3}, "'num_hidden_layers' is 3 but the checkpoint holds 4 encoder layer"),
    ({"hidden_size": 128}, "'hidden_size' is 128 but the checkpoint's tensors hold 64 "
                           "\\(vit.embeddings.cls_token has shape \\[1, 1, 64\\]\\)"),
    ({"intermediate_size": 4096}, "'intermediate_size' is 4096 but the checkpoint's tensors hold 128"),
    ({"num_channels": 1}, "'num_channels' is 1 but the checkpoint's tensors hold 3"),
    ({"patch_size": 8}, "'patch_size' is 8 but the checkpoint's tensors hold 4"),
    ({"image_size": 64}, "'image_size' 64 / 'patch_size' 4 make 257 positions but the checkpoint's tensors "
                         "hold 65"),
    ({"id2label": {str(i): str(i) for i in range(50_000)}},
     "'id2label' / 'num_labels' give 50000 labels but the checkpoint's tensors hold 10 "
     "\\(classifier.weight has shape \\[10, 64\\]\\)"),
    ({"id2label": None, "num_labels": 3}, "'id2label' / 'num_labels' give 3 labels but the checkpoint's tensors hold 10"),
])
def test_config_that_lies_about_the_tensors(digits, changes, message):
    d = json.loads((digits / "config.json").read_text())
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None}
    start = time.process_time()
    cfg = ViTConfig.from_dict(d, source="config.json")
    with pytest.raises(vitnp.ConfigError, match=f"config.json: {message}"):
        check_against_tensors(cfg, shapes_of(digits), source="config.json")
    assert time.process_time() - start < 1.0  # header shapes only: nothing sized by the claim is built


def test_config_that_tells_the_truth_passes(digits):
    check_against_tensors(load_config(digits / "config.json"), shapes_of(digits))


def test_inconsistent_checkpoint_is_left_to_tensor_validation(digits):
    """The tensors disagree among themselves (classifier.weight 11 rows, .bias 10): no config field is
    blamed; the tensor-by-tensor validation lists what is wrong."""
    shapes = shapes_of(digits)
    shapes["classifier.weight"] = (11, 64)
    shapes["vit.encoder.layer.7.extra.weight"] = (3,)
    check_against_tensors(load_config(digits / "config.json"), shapes)


def test_claims_checked_for_both_heads_of_a_distilled_deit(tiny_deit_distilled):
    cfg = load_config(tiny_deit_distilled / "config.json")
    shapes = shapes_of(tiny_deit_distilled)
    check_against_tensors(cfg, shapes)
    lying = ViTConfig.from_dict({**json.loads((tiny_deit_distilled / "config.json").read_text()),
                                 "id2label": {"0": "a"}})
    with pytest.raises(vitnp.ConfigError, match="give 1 labels but the checkpoint's tensors hold 6 "
                                                "\\(cls_classifier.weight"):
        check_against_tensors(lying, shapes)


# ---- the issue's rows end to end through vitnp.load -------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda h: b"[1, 2]", "header is a JSON array"),
    (lambda h: b'"weights"', "header is a JSON string"),
    (entry("classifier.bias", data_offsets=["0", "40"]), "must be two non-negative integers"),
    (entry("classifier.bias", data_offsets=[0.0, 40.0]), "must be two non-negative integers"),
    (entry("classifier.bias", dtype=["F32"]), "unknown dtype"),
    (entry("classifier.bias", shape=[10.0]), "must be a list of non-negative integers"),
    (entry("classifier.bias", dtype="F16"), "span 40 bytes but shape \\[10\\] of F16 takes 20"),
    (entry("classifier.bias", data_offsets=[-48, -8]), "must be two non-negative integers"),
    (lambda h: h["vit.layernorm.weight"].update(data_offsets=h["vit.layernorm.bias"]["data_offsets"]), "overlaps"),
], ids=["header-list", "header-string", "offsets-strings", "offsets-floats", "dtype-list", "shape-float",
        "byte-length", "negative-offsets", "same-bytes"])
def test_load_rejects_malformed_header(digits, edit, message):
    path = patch_header(digits, edit)
    with pytest.raises(vitnp.CheckpointError, match=message) as e:
        vitnp.load(digits, progress=False)
    assert str(path) in str(e.value)


def test_load_rejects_nan_weights(digits):
    nan_weights(digits)
    with pytest.raises(vitnp.CheckpointError, match="'vit.encoder.layer.2.output.dense.weight' holds 1 non-finite"):
        vitnp.load(digits)


def test_load_rejects_a_config_that_lies_in_milliseconds(digits):
    patch_config(digits, num_hidden_layers=1000)
    with pytest.raises(vitnp.ConfigError, match="'num_hidden_layers' is 1000 but the checkpoint holds 4"):
        vitnp.load(digits)


def load_peak_bytes(model_dir: Path, error=vitnp.ConfigError, match: str = "") -> int:
    """vitnp.load(model_dir) must raise `error`; the peak of what Python allocated meanwhile."""
    import tracemalloc

    vitnp.load(DIGITS, progress=False)  # the kernels load once, outside the measurement
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match):
            vitnp.load(model_dir, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 10**6}, "'num_hidden_layers' is 1000000, above the largest"),
    ({"num_hidden_layers": 1e6}, "'num_hidden_layers' must be a positive integer, got 1000000.0"),
    ({"num_hidden_layers": 1000}, "'num_hidden_layers' is 1000 but the checkpoint holds 4"),
    ({"num_labels": 10**9, "id2label": None}, "'num_labels' must be an integer in 1..100000"),
    ({"num_labels": 1e9, "id2label": None}, "'num_labels' must be an integer in 1..100000"),
])
def test_load_refuses_config_sizes_before_allocating(digits, changes, message):
    """The issue's rows that took 3.6 GB and 12-28 s: refused with a few MB allocated."""
    d = json.loads((digits / "config.json").read_text())
    d.update(changes)
    (digits / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    assert load_peak_bytes(digits, match=message) < 16 << 20


@pytest.mark.parametrize("changes,message", [
    ({"size": {"height": 30000, "width": 30000}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}},
     "field 'size' must be an int in 1..4096"),
    ({"size": 30000, "do_center_crop": True, "crop_size": 32}, "field 'size' must be an int in 1..4096"),
    ({"size": {"shortest_edge": 30000}, "do_center_crop": True, "crop_size": 32}, "field 'size'"),
    ({"crop_size": {"height": 30000, "width": 30000}, "do_center_crop": True}, "field 'crop_size'"),
])
def test_load_refuses_a_huge_preprocessor_size(digits, changes, message):
    """A 30000 x 30000 resize before a 32-pixel crop took > 3.7 GB per image: refused at load."""
    path = digits / "preprocessor_config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    assert load_peak_bytes(digits, match=message) < 16 << 20
