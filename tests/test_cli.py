"""The `vitnp classify` command, run as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import vitnp


def run_cli(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitnp", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, examples_dir):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    shutil.copy(examples_dir / "cats.jpg", root / "a.jpg")
    shutil.copy(examples_dir / "coffee.jpg", root / "sub" / "b.JPG")
    (root / "notes.txt").write_text("not an image, and not picked up by the directory walk")
    return root


def test_json_lines_match_library(tiny_vit, image_tree):
    result = run_cli("classify", image_tree, "--model", tiny_vit, "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(image_tree / "a.jpg"), str(image_tree / "sub" / "b.JPG")]
    clf = vitnp.load(tiny_vit)
    for r in records:
        expected = clf.classify(r["path"], top_k=3)
        assert [p["label"] for p in r["predictions"]] == [p["label"] for p in expected]
        assert [p["score"] for p in r["predictions"]] == pytest.approx([p["score"] for p in expected], abs=1e-6)


def test_table_output_and_options(tiny_deit_distilled, examples_dir):
    result = run_cli("classify", examples_dir / "cats.jpg", "--model", tiny_deit_distilled, "--top-k", "2",
                     "--function-to-apply", "sigmoid", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(examples_dir / "cats.jpg") and len(lines) == 3
    expected = vitnp.load(tiny_deit_distilled).classify(examples_dir / "cats.jpg", top_k=2, function_to_apply="sigmoid")
    for line, p in zip(lines[1:], expected):
        score, label = line.split(maxsplit=1)
        assert label.strip() == p["label"] and float(score) == pytest.approx(p["score"], abs=1e-4)


def test_bad_files_are_reported_and_do_not_stop_the_run(tiny_vit, image_tree, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((image_tree / "a.jpg").read_bytes()[:300])
    text = tmp_path / "text.png"
    text.write_text("hello")
    result = run_cli("classify", broken, image_tree / "a.jpg", text, tmp_path / "missing.jpg",
                     "--model", tiny_vit, "--json", "--batch-size", "2")
    assert result.returncode == 1
    records = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert len(records) == 4
    assert "predictions" in records[str(image_tree / "a.jpg")]
    for bad in (broken, text, tmp_path / "missing.jpg"):
        assert records[str(bad)]["error"]
    assert "3 of 4 images failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_offline_with_empty_cache_prints_one_clear_message(tmp_path, examples_dir):
    result = run_cli("classify", examples_dir / "cats.jpg",
                     env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "google/vit-base-patch16-224" in result.stderr and "bundled:digits" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--top-k", "0"], "expected a positive integer"),
    (["--batch-size", "x"], "expected a positive integer"),
    (["--function-to-apply", "relu"], "invalid choice"),
])
def test_bad_parameters(args, message, tiny_vit, examples_dir):
    result = run_cli("classify", examples_dir / "cats.jpg", "--model", tiny_vit, *args)
    assert result.returncode == 2 and message in result.stderr


def test_no_images_found(tmp_path, tiny_vit):
    result = run_cli("classify", tmp_path, "--model", tiny_vit)
    assert result.returncode == 1 and "no image files found" in result.stderr


def test_bad_model_is_one_message(tmp_path, examples_dir):
    result = run_cli("classify", examples_dir / "cats.jpg", "--model", tmp_path)
    assert result.returncode == 2 and "has no config.json" in result.stderr and "Traceback" not in result.stderr


def test_progress_bar_on_a_terminal(tiny_vit, examples_dir, tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    for i in range(20):
        shutil.copy(examples_dir / "coffee.jpg", tmp_path / f"{i:02d}.jpg")
    controller, terminal = pty.openpty()
    # A fresh pty is 0 columns wide, which makes tqdm draw an empty bar.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "vitnp", "classify", str(tmp_path), "--model", str(tiny_vit),
                             "--json"], stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    stdout, _ = proc.communicate(timeout=300)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.returncode == 0
    assert len(stdout.splitlines()) == 20
    assert b"20/20" in shown and b"img" in shown


def test_closed_pipe_stops_quietly(tiny_vit, image_tree):
    """`vitnp classify ... | head -1`: no traceback when the reader goes away."""
    proc = subprocess.Popen([sys.executable, "-m", "vitnp", "classify", str(image_tree), "--model", str(tiny_vit),
                             "--batch-size", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert b"Traceback" not in err and proc.returncode in (0, 141)


def test_cli_process_does_not_load_scipy_blas_for_numba(examples_dir):
    """Numba's start-up probe would import SciPy's BLAS (29 MB) where SciPy is installed; the CLI skips it and
    still classifies. The library, imported by a user's program, leaves SciPy alone."""
    script = ("import sys; from vitnp.cli import main; "
              "code = main(['classify', '--model', 'bundled:digits', sys.argv[1]]); "
              "print(code, sys.modules.get('scipy.linalg') is not None)")
    run = subprocess.run([sys.executable, "-c", script, str(examples_dir / "digits" / "digit-3-idx0705.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.splitlines()[-1] == "0 False", run.stderr[-2000:]
    assert "  3\n" in run.stdout or " 3\n" in run.stdout


@pytest.mark.parametrize("command", [["classify", "digits"], ["serve"]])
def test_a_backend_with_int8_is_a_clear_error(command, examples_dir):
    """Under int8 no layer is float32, so a GEMM backend choice would be ignored: the command refuses it."""
    result = run_cli(*command, "--model", "bundled:digits", "--backend", "blas", "--precision", "int8",
                     cwd=examples_dir)
    assert result.returncode == 2, result.stderr
    assert "backend 'blas' has no effect with precision 'int8'" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_command_lines_become_settings_values(monkeypatch):
    from vitnp.cli import parse_command
    from vitnp.options import ClassifyOptions, EngineOptions, RayOptions, ServingOptions

    monkeypatch.delenv("VITNP_API_TOKEN", raising=False)
    plain = parse_command(["serve", "--model", "bundled:digits"])
    assert plain.serving == ServingOptions() and plain.engine == EngineOptions() and plain.ray is None
    assert plain.models == ("bundled:digits",) and plain.token is None
    tuned = parse_command(["serve", "-m", "a/b", "-m", "c/d", "--max-batch-size", "4", "--max-wait-ms", "20",
                           "--threads", "2", "--precision", "bf16", "--ray", "--autoscale", "1:3"])
    assert tuned.models == ("a/b", "c/d") and tuned.engine == EngineOptions("auto", "bf16", 2)
    assert (tuned.serving.max_batch_size, tuned.serving.max_wait_s) == (4, 0.02)
    assert tuned.serving.warmup_batch_sizes == (1, 4)
    assert tuned.ray == RayOptions(autoscale=(1, 3))
    assert parse_command(["classify", "x.jpg"]) == ClassifyOptions(inputs=("x.jpg",))
    job = parse_command(["classify", "x.jpg", "y/", "--ray", "--workers", "2", "-o", "out.parquet",
                         "--backend", "numba"])
    assert job.ray == RayOptions(workers=2) and job.output == "out.parquet"
    assert job.engine.with_fixed_layout() == EngineOptions("numba")
    assert parse_command(["classify", "x.jpg"]).engine.with_fixed_layout() == EngineOptions("numba")
