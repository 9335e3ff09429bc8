"""Config parsing, checkpoint validation and Hub loading (offline, from a pre-filled hub cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoints import fill_hub_cache

import vitnp
from vitnp.config import ViTConfig, load_config


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


# ---- config.json -------------------------------------------------------------------------------------------

def test_config_fields_parsed(tiny_deit_distilled):
    cfg = load_config(tiny_deit_distilled / "config.json")
    raw = json.loads((tiny_deit_distilled / "config.json").read_text())
    assert cfg.architecture == "DeiTForImageClassificationWithTeacher"
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size) == (raw["image_size"], raw["patch_size"],
                                                                   raw["hidden_size"])
    assert cfg.num_labels == len(raw["id2label"]) and cfg.id2label[2] == raw["id2label"]["2"]
    assert cfg.num_prefix_tokens == 2 and cfg.distilled and cfg.seq_len == 18
    with pytest.raises(Exception):
        cfg.image_size = 1  # frozen


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["ViTForMaskedImageModeling"]}, "unsupported architecture.*ViTForImageClassification"),
    ({"architectures": ["BeitForImageClassification"], "model_type": "beit"}, "unsupported architecture"),
    ({"hidden_act": "relu"}, "unsupported hidden_act 'relu'; vitnp supports gelu"),
    ({"hidden_size": 50}, "hidden_size 50 is not divisible by num_attention_heads 4"),
    ({"patch_size": 5}, "image_size 32 is not a multiple of patch_size 5"),
    ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be a positive integer"),
    ({"problem_type": "ranking"}, "unknown problem_type 'ranking'"),
    ({"id2label": {"0": "a", "2": "b"}}, "keys must be 0..1 without gaps"),
])
def test_config_errors(tmp_path, tiny_vit, changes, message):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    edit_config(model_dir, **changes)
    with pytest.raises(vitnp.ConfigError, match=message):
        vitnp.load(model_dir)


def test_config_not_json(tmp_path, tiny_vit):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(vitnp.ConfigError, match="not valid JSON"):
        vitnp.load(model_dir)


def test_defaults_when_fields_absent():
    cfg = ViTConfig.from_dict({"architectures": ["ViTForImageClassification"], "num_labels": 3})
    assert (cfg.image_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.qkv_bias) == (224, 768, 1e-12, True)
    assert cfg.id2label == ("LABEL_0", "LABEL_1", "LABEL_2")


def test_missing_preprocessor_config_uses_transformers_defaults(tmp_path, tiny_vit, examples_dir):
    import transformers

    model_dir = copy_model(tiny_vit, tmp_path / "m")
    (model_dir / "preprocessor_config.json").unlink()
    edit_config(model_dir, image_size=224, patch_size=56)  # the default processor size is 224
    model = transformers.ViTForImageClassification(transformers.ViTConfig.from_pretrained(model_dir))
    model.save_pretrained(model_dir)
    clf = vitnp.load(model_dir)
    ref = transformers.ViTImageProcessorPil()
    from PIL import Image

    img = Image.open(examples_dir / "coffee.jpg")
    np.testing.assert_array_equal(clf.preprocess(img), ref(images=img, return_tensors="np")["pixel_values"])


def test_preprocessor_size_must_match_model(tmp_path, tiny_vit):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    pre["size"] = {"height": 48, "width": 48}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(vitnp.ConfigError, match="produces 48x48 images but the model expects 32x32"):
        vitnp.load(model_dir)


# ---- model.safetensors -------------------------------------------------------------------------------------

def rewrite_tensors(model_dir: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, tiny_vit):
    model_dir = copy_model(tiny_vit, tmp_path / "m")

    def edit(t):
        del t["vit.encoder.layer.1.output.dense.bias"]
        t["vit.encoder.layer.7.extra.weight"] = np.zeros(3, np.float32)
        t["classifier.weight"] = np.zeros((11, 48), np.float32)

    rewrite_tensors(model_dir, edit)
    with pytest.raises(vitnp.CheckpointError) as e:
        vitnp.load(model_dir)
    msg = str(e.value)
    assert "missing tensors: vit.encoder.layer.1.output.dense.bias" in msg
    assert "unexpected tensors: vit.encoder.layer.7.extra.weight" in msg
    assert "classifier.weight has shape [11, 48], config.json implies [10, 48]" in msg


def test_unsupported_dtype(tmp_path, tiny_vit):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    rewrite_tensors(model_dir, lambda t: t.update({"vit.layernorm.bias": t["vit.layernorm.bias"].astype(np.float64)}))
    with pytest.raises(vitnp.CheckpointError, match="vit.layernorm.bias has dtype F64; supported: F32, F16, BF16"):
        vitnp.load(model_dir)


def test_pooler_tensors_are_ignored_like_transformers(tmp_path, tiny_vit):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    rewrite_tensors(model_dir, lambda t: t.update({"vit.pooler.dense.weight": np.zeros((48, 48), np.float32),
                                                   "vit.pooler.dense.bias": np.zeros(48, np.float32)}))
    x = np.zeros((1, 3, 32, 32), np.float32)
    np.testing.assert_array_equal(vitnp.load(model_dir).logits(x), vitnp.load(tiny_vit).logits(x))


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "beyond the end of the file"),
    (lambda p: p.write_bytes(b"\x05"), "not a safetensors file"),
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{{{{{{{{{"), "not a safetensors file"),
    (lambda p: p.unlink(), "no model.safetensors or model.safetensors.index.json found"),
])
def test_malformed_weights_file(tmp_path, tiny_vit, damage, message):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    damage(model_dir / "model.safetensors")
    with pytest.raises(vitnp.CheckpointError, match=message):
        vitnp.load(model_dir)


def test_pytorch_bin_only_is_explained(tmp_path, tiny_vit):
    model_dir = copy_model(tiny_vit, tmp_path / "m")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(vitnp.CheckpointError, match="only pytorch_model.bin is present; vitnp reads safetensors"):
        vitnp.load(model_dir)


# ---- names: directories, bundled models, Hub ids ---------------------------------------------------------------

def test_directory_without_config(tmp_path):
    with pytest.raises(vitnp.ModelNotFoundError, match="is a directory but not a model: it has no config.json"):
        vitnp.load(tmp_path)


@pytest.mark.parametrize("name", ["a/b/c", "../x/../y", "bad name", "org/na$me"])
def test_invalid_names(name):
    with pytest.raises(vitnp.ModelNotFoundError, match="neither an existing directory nor a valid Hugging Face"):
        vitnp.load(name)


def test_unknown_bundled_model():
    with pytest.raises(vitnp.ModelNotFoundError, match="no bundled model 'bundled:nope'; bundled models: "):
        vitnp.load("bundled:nope")


def test_invalid_load_parameters(tiny_vit):
    with pytest.raises(vitnp.ParameterError, match="backend must be one of auto, numba, blas"):
        vitnp.load(tiny_vit, backend="gpu")
    with pytest.raises(vitnp.ParameterError, match="threads must be a positive integer"):
        vitnp.load(tiny_vit, threads=0)


def test_hub_id_from_prefilled_cache(tmp_path, tiny_deit_distilled):
    """The real huggingface_hub download path, answered from a cache in the hub's own layout."""
    cache = tmp_path / "hub"
    snapshot = fill_hub_cache(cache, "facebook/deit-tiny-test", tiny_deit_distilled)
    clf = vitnp.load("facebook/deit-tiny-test", cache_dir=cache, local_files_only=True)
    assert clf.model_id == "facebook/deit-tiny-test"
    assert clf.location.path == snapshot
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(clf.logits(x), vitnp.load(tiny_deit_distilled).logits(x))


def run_offline(args, cache, **env):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), **env}
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=full_env, timeout=300)


def test_offline_env_loads_from_cache_and_fetches_nothing_else(tmp_path, tiny_vit):
    cache = tmp_path / "hub"
    fill_hub_cache(cache, "google/vit-tiny-test", tiny_vit)
    code = ("import vitnp, numpy as np; c = vitnp.load('google/vit-tiny-test'); "
            "print(c.location.path); print(c.logits(np.zeros((1,3,32,32), np.float32)).tolist())")
    result = run_offline([code], cache)
    assert result.returncode == 0, result.stderr
    path, logits = result.stdout.strip().splitlines()
    assert "models--google--vit-tiny-test/snapshots" in path
    expected = vitnp.load(tiny_vit).logits(np.zeros((1, 3, 32, 32), np.float32))
    np.testing.assert_allclose(json.loads(logits), expected, atol=1e-6)


def test_offline_with_empty_cache_says_how_to_proceed(tmp_path):
    code = "import vitnp; vitnp.load('google/vit-base-patch16-224')"
    result = run_offline([code], tmp_path / "empty")
    assert result.returncode != 0
    assert "OfflineError" in result.stderr
    assert "bundled:digits" in result.stderr and "not in" in result.stderr


def test_allow_patterns_exclude_other_weight_formats():
    from vitnp.hub import HUB_FILES

    import fnmatch

    wanted = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors"]
    unwanted = ["pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "README.md", "onnx/model.onnx"]
    assert all(any(fnmatch.fnmatch(f, p) for p in HUB_FILES) for f in wanted)
    assert not any(fnmatch.fnmatch(f, p) for f in unwanted for p in HUB_FILES)


# ---- engine options and the layers they build ---------------------------------------------------------------

def test_kernels_know_the_same_backends_users_may_choose():
    from vitnp.kernels.linear import BACKENDS
    from vitnp.options import BACKENDS as USER_BACKENDS

    assert BACKENDS == USER_BACKENDS


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_each_layer_is_float32_or_reduced_as_its_precision_says(tiny_deit_distilled, precision):
    """fp32: float32 everywhere; bf16: every projection but the classifier heads; int8: all of them."""
    from vitnp.kernels import Linear
    from vitnp.kernels.qlinear import QLinear

    clf = vitnp.load(tiny_deit_distilled, precision=precision, backend="numba")
    w = clf.weights
    encoder = [layer for block in w.layers for layer in (block.qkv, block.attn_out, block.fc1, block.fc2)]
    for layer in [w.patch_embed, *encoder, *w.heads]:
        head = any(layer is h for h in w.heads)
        if precision == "fp32" or (precision == "bf16" and head):
            assert isinstance(layer, Linear) and layer.backend == "numba", layer
        else:
            assert isinstance(layer, QLinear) and layer.precision == precision, layer
            assert layer.backend == "numba", "an explicit backend: the reduced kernel, never float32"
    assert len(w.heads) == 2 and w.layers[0].qkv.out_features == 3 * clf.config.hidden_size


def test_load_takes_engine_options(tiny_vit):
    from vitnp.options import EngineOptions

    clf = vitnp.load(tiny_vit, options=EngineOptions(backend="blas", precision="bf16", threads=1))
    assert (clf.backend, clf.precision, clf.threads) == ("blas", "bf16", 1)
    assert clf.options == EngineOptions(backend="blas", precision="bf16", threads=1)
    assert clf.weights.heads[0].backend == "blas"
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(clf.logits(x), vitnp.load(tiny_vit, backend="blas", precision="bf16",
                                                             threads=1).logits(x))


@pytest.mark.parametrize("kwargs,message", [
    ({"backend": "numba"}, "pass backend in options or as keyword arguments, not both"),
    ({"precision": "int8", "threads": 2}, "pass threads, precision in options or as keyword arguments, not both"),
])
def test_load_refuses_options_and_the_same_settings_as_keywords(tiny_vit, kwargs, message):
    from vitnp.options import EngineOptions

    with pytest.raises(vitnp.ParameterError, match=message):
        vitnp.load(tiny_vit, options=EngineOptions(), **kwargs)


def test_under_int8_the_backend_says_whether_a_layer_may_run_float32(tiny_vit):
    """No layer is float32 under int8: "blas" would choose nothing; "numba" keeps every layer on the int8 kernel,
    "auto" lets each run float32 where that is faster (vitnp.layers)."""
    from vitnp.options import EngineOptions

    with pytest.raises(vitnp.ParameterError, match="backend 'blas' has no effect with precision 'int8'"):
        vitnp.load(tiny_vit, backend="blas", precision="int8")
    for backend in ("numba", "auto"):
        layer = vitnp.load(tiny_vit, backend=backend, precision="int8").weights.layers[0].fc1
        assert (layer.precision, layer.backend) == ("int8", backend)
    # weights shared read-only between processes never move to float32
    assert EngineOptions(precision="int8").with_fixed_layout() == EngineOptions("numba", "int8")


def test_isa_option_must_match_the_kernels_already_loaded(tiny_vit):
    from vitnp.kernels import isa
    from vitnp.options import EngineOptions

    other = next(name for name in isa.ISAS if name != isa.ISA)
    with pytest.raises(vitnp.ParameterError, match=f"isa '{other}' was asked for, but the kernels of this process "
                                                   f"already run '{isa.ISA}'"):
        vitnp.load(tiny_vit, options=EngineOptions(isa=other))
    assert vitnp.load(tiny_vit, options=EngineOptions(isa=isa.ISA)).options.isa == isa.ISA


def test_isa_option_chooses_the_kernels_isa_before_they_load():
    from vitnp.kernels import isa

    runnable = isa.ISAS[isa.ISAS.index(isa.host_isa()):]
    wanted = runnable[-1]  # the narrowest: always runnable, and never the default on a vector-capable CPU
    code = ("import sys, vitnp.classifier as c; assert 'vitnp.kernels' not in sys.modules; "
            f"c.use_isa({wanted!r}); from vitnp.kernels import isa; print(isa.ISA)")
    env = {k: v for k, v in os.environ.items() if k not in ("VITNP_ISA", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == wanted
