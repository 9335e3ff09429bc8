"""The `vitnp classify` command, run as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# ---- folders the user does not control -------------------------------------------------------------------------


def records_of(stdout: str) -> dict:
    return {r["path"]: r for r in map(strict_json, stdout.splitlines())}


def strict_json(line: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


def test_fifos_sockets_and_devices_are_reported_and_never_opened(tiny_vit, examples_dir, tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the run must not hang on one."""
    import socket

    shutil.copy(examples_dir / "cats.jpg", tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "b.png")
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(tmp_path / "c.jpg"))
    named_fifo = tmp_path / "named.jpg"
    os.mkfifo(named_fifo)
    try:
        result = subprocess.run([sys.executable, "-m", "vitnp", "classify", str(tmp_path), str(named_fifo),
                                 "/dev/zero", "--model", str(tiny_vit), "--json"],
                                capture_output=True, text=True, timeout=120)
    finally:
        listening.close()
    assert result.returncode == 1, result.stderr
    records = records_of(result.stdout)
    assert "predictions" in records[str(tmp_path / "a.jpg")]
    assert records[str(tmp_path / "b.png")]["error"].endswith("b.png': a FIFO (named pipe), not a regular file; "
                                                               "not opened")
    assert "a socket, not a regular file" in records[str(tmp_path / "c.jpg")]["error"]
    assert "a FIFO (named pipe), not a regular file" in records[str(named_fifo)]["error"]
    assert "a character device, not a regular file" in records["/dev/zero"]["error"]
    assert len(result.stdout.splitlines()) == 6  # named.jpg is found in the folder and named on the command line
    assert "5 of 6 images failed" in result.stderr and "Traceback" not in result.stderr


def without_root_file_access():
    """In the child: give up the capabilities that let root read any file (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH), so permission bits apply to it as to any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the next program's set
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_unreadable_subdirectory_and_file_are_error_records(tiny_vit, examples_dir, tmp_path):
    shutil.copy(examples_dir / "cats.jpg", tmp_path / "a.jpg")
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(examples_dir / "coffee.jpg", locked / "b.jpg")
    locked.chmod(0)
    shutil.copy(examples_dir / "coffee.jpg", tmp_path / "c.jpg")
    (tmp_path / "c.jpg").chmod(0)
    try:
        result = subprocess.run([sys.executable, "-m", "vitnp", "classify", str(tmp_path), "--model", str(tiny_vit),
                                 "--json"], capture_output=True, text=True, timeout=300,
                                preexec_fn=without_root_file_access if os.geteuid() == 0 else None)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    records = records_of(result.stdout)
    assert records[str(locked)]["error"] == f"'{locked}': cannot read directory (Permission denied)"
    assert records[str(tmp_path / "c.jpg")]["error"] == f"'{tmp_path / 'c.jpg'}': cannot open file (Permission denied)"
    assert "predictions" in records[str(tmp_path / "a.jpg")] and len(records) == 3
    assert "2 of 3 images failed" in result.stderr


def test_a_directory_whose_path_is_too_long_to_read_is_an_error_record(tmp_path):
    """Nested names of 242 characters: the walk reaches a directory whose path exceeds PATH_MAX, which
    the system refuses to list. The only input is in error, so no model is loaded."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(20):
        name = f"{i:02d}" + "d" * 240
        os.mkdir(name, dir_fd=fd)
        deeper = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.close(fd)
    result = run_cli("classify", tmp_path, "--model", "no/such-model", "--json")
    assert result.returncode == 1, result.stderr
    [record] = map(strict_json, result.stdout.splitlines())
    assert record["error"].endswith("': cannot read directory (File name too long)")
    assert len(record["path"]) > os.pathconf(tmp_path, "PC_PATH_MAX")
    assert "1 of 1 images failed" in result.stderr


# ---- writing the results ----------------------------------------------------------------------------------------


def digits_command(*args):
    return [sys.executable, "-m", "vitnp", "classify", "digits", "--model", "bundled:digits", *args]


def test_stdout_on_a_full_disk_is_one_clear_line(examples_dir):
    with open("/dev/full", "w") as full:
        result = subprocess.run(digits_command("--json"), stdout=full, stderr=subprocess.PIPE, text=True,
                                cwd=examples_dir, timeout=300)
    assert result.returncode == 2
    assert result.stderr == "vitnp: cannot write the results: No space left on device\n"


def test_output_filling_up_part_way_keeps_whole_records(examples_dir, tmp_path):
    """The file size limit (RLIMIT_FSIZE) ends a write part-way through the third record, as a full disk
    would: the file keeps the first two records, whole, and the run ends with one line. The limit applies
    to every file the process writes, so the kernels are compiled and cached by a first run (backend numba:
    the auto backend could time its way to a kernel the first run did not compile)."""
    import resource

    command = digits_command("--json", "--batch-size", "2", "--backend", "numba")
    whole = subprocess.run(command, capture_output=True, cwd=examples_dir, timeout=300)
    assert whole.returncode == 0, whole.stderr
    lines = whole.stdout.splitlines(keepends=True)
    limit = len(lines[0]) + len(lines[1]) + len(lines[2]) // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with open(tmp_path / "out.jsonl", "wb") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.PIPE, text=True, cwd=examples_dir,
                                timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 2
    assert result.stderr == "vitnp: cannot write the results: File too large\n"
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(lines[:2])


@pytest.mark.parametrize("output", ["--json", "text"])
def test_closed_stdout_is_an_error(output, examples_dir):
    """`vitnp classify ... >&-`: no output and exit 0 would look like success."""
    command = " ".join(f"'{a}'" for a in digits_command(*([output] if output != "text" else [])))
    result = subprocess.run(["sh", "-c", f"exec {command} >&-"], capture_output=True, text=True,
                            cwd=examples_dir, timeout=300)
    assert result.returncode == 2
    assert result.stderr == "vitnp: standard output is closed: nowhere to write the results\n"


def test_non_finite_scores_are_error_records_in_strict_json(tiny_vit, examples_dir, tmp_path):
    """Finite weights can still overflow float32: the record says so, and --json never writes NaN."""
    from checkpoints import make_overflowing_copy

    model = make_overflowing_copy(tiny_vit, tmp_path / "model")
    as_json = run_cli("classify", examples_dir / "cats.jpg", "--model", model, "--json")
    assert as_json.returncode == 1, as_json.stderr
    [record] = map(strict_json, as_json.stdout.splitlines())
    assert set(record) == {"path", "error"} and "the model's scores are not finite numbers" in record["error"]
    as_text = run_cli("classify", examples_dir / "cats.jpg", "--model", model)
    assert as_text.returncode == 1 and as_text.stdout == ""
    assert "the model's scores are not finite numbers" in as_text.stderr
    assert "Warning" not in as_json.stderr + as_text.stderr


# ---- memory ---------------------------------------------------------------------------------------------------


def peak_rss_mb(args, cwd) -> float:
    """Peak resident memory (VmHWM) of a fresh process running `vitnp` with these arguments, from the moment its
    kernels are loaded (before it, the compiler's pages set an earlier peak that would hide the images')."""
    script = ("import sys; from vitnp.classifier import compile_kernels; compile_kernels(progress=False); "
              "open('/proc/self/clear_refs', 'w').write('5'); "  # 5: reset the peak to the current RSS
              "from vitnp.cli import main; code = main(sys.argv[1:]); "
              "peak = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')); "
              "print(code, int(peak.split()[1]) / 1024, file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=300)
    code, peak = run.stderr.splitlines()[-1].split()
    assert code == "0", run.stderr
    return float(peak)


def test_a_batch_holds_one_full_size_image_at_a_time(tiny_vit, examples_dir, tmp_path):
    """Eight 15 MP images in one batch of 8 take about the memory of one: each is reduced to its pixel
    values before the next is decoded (full-size decodes would add ~60 MB each)."""
    from test_decode_memory import flat_gray_png

    png = flat_gray_png(4000, 3750)  # 15 MP, decoded in full (below EXACT_DECODE_MAX_PIXELS): 60 MB as RGB
    for name in ("one", "eight"):
        (tmp_path / name).mkdir()
    (tmp_path / "one" / "0.png").write_bytes(png)
    for i in range(8):
        (tmp_path / "eight" / f"{i}.png").write_bytes(png)
    common = ["--model", tiny_vit, "--json", "--batch-size", "8"]
    small = peak_rss_mb(["classify", examples_dir / "cats.jpg", *common], tmp_path)
    one = peak_rss_mb(["classify", "one", *common], tmp_path)
    eight = peak_rss_mb(["classify", "eight", *common], tmp_path)
    print(f"[memory] peak RSS: small image {small:.1f} MB, one 15 MP image {one:.1f} MB, "
          f"a batch of eight {eight:.1f} MB")
    one_image = one - small
    assert one_image > 15  # the decode is large enough to see
    assert eight - small < 2 * one_image
