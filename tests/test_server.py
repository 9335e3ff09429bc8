"""The HTTP server, tested with real clients against real `python -m vitnp serve` processes on 127.0.0.1.

Every answer is compared with the library (vitnp.load(dir).classify) on the same checkpoint. Servers and the
library both use backend="numba", whose results do not depend on the batch size, so equality is exact.
Every request loop is bounded; servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

import vitnp
from checkpoints import fill_hub_cache

TOKEN = "test-secret-token-0123456789"
TOKEN_ENV = "VITNP_TEST_SERVER_TOKEN"
ON_DEMAND_ID = "test-org/on-demand-vit"
VIT_NAME = "test-org/tiny-vit"
DEIT_NAME = "test-org/tiny-deit"
STARTUP_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
BACKEND = "numba"


# --------------------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    # What a readiness probe may meet while the server starts (anything else fails the start-up), and how
    # often it probes.  The port opens before the models are loaded: /health/ready answers 200 once they are.
    NOT_UP_YET = (requests.ConnectionError,)
    POLL_S = 0.2

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None,
                 up_path: str = "/health/ready"):
        """up_path: the probe that must answer 200 before the server counts as started (/health/live: as soon
        as the port is open, while the models may still be loading)."""
        self.up_path = up_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "vitnp", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend", BACKEND, *args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=cwd)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + self.up_path, timeout=5).status_code == 200:
                    return
            except self.NOT_UP_YET:
                pass
            time.sleep(self.POLL_S)
        self.stop()
        raise RuntimeError(f"server did not start within {STARTUP_TIMEOUT_S}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, tiny_vit) -> Path:
    cache = tmp_path_factory.mktemp("hub-cache")
    fill_hub_cache(cache, ON_DEMAND_ID, tiny_vit)
    return cache


@pytest.fixture(scope="session")
def server_cwd(tmp_path_factory, tiny_vit) -> Path:
    """The server's working directory holds a checkpoint at a path that looks like a Hub id."""
    cwd = tmp_path_factory.mktemp("server-cwd")
    shutil.copytree(tiny_vit, cwd / "local-org" / "local-vit")
    return cwd


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_vit, tiny_deit, hub_cache, server_cwd):
    """The main server: two models, on-demand loading from an offline hub cache, small body/pixel limits."""
    log_path = tmp_path_factory.mktemp("logs") / "main-server.log"
    env = {"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "VITNP_API_TOKEN": ""}
    proc = ServerProcess(
        ["--model", f"{VIT_NAME}={tiny_vit}", "--model", f"{DEIT_NAME}={tiny_deit}", "--load-on-demand",
         "--max-batch-size", "8", "--max-wait-ms", "20", "--max-body-mb", "1", "--max-image-pixels", "1000000",
         "--cache-size", "256", "--body-timeout", "3"],
        log_path, env=env, cwd=server_cwd)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def guarded_server(tmp_path_factory, tiny_vit):
    """A token-protected server whose queue holds 2 requests and whose batches wait 4 s to fill."""
    log_path = tmp_path_factory.mktemp("logs") / "guarded-server.log"
    proc = ServerProcess(["--model", str(tiny_vit), "--token-env", TOKEN_ENV, "--max-batch-size", "4",
                          "--max-wait-ms", "4000", "--max-queue", "2"],
                         log_path, env={TOKEN_ENV: TOKEN, "HF_HUB_OFFLINE": "1"})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def lib_vit(tiny_vit):
    return vitnp.load(tiny_vit, backend=BACKEND)


@pytest.fixture(scope="session")
def lib_deit(tiny_deit):
    return vitnp.load(tiny_deit, backend=BACKEND)


@pytest.fixture(scope="session")
def cats(examples_dir) -> bytes:
    return (examples_dir / "cats.jpg").read_bytes()


@pytest.fixture(scope="session")
def coffee(examples_dir) -> bytes:
    return (examples_dir / "coffee.jpg").read_bytes()


def png_bytes(width: int, height: int, seed: int | None = None) -> bytes:
    if seed is None:
        img = Image.new("RGB", (width, height), (200, 30, 90))
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, timeout=REQUEST_TIMEOUT_S, **kwargs)


def raw_request(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send a request byte for byte on a fresh connection; (status, whole reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    assert "Traceback" not in response.text
    return body


# --------------------------------------------------------------------------- success: every client


def test_health_and_models(server, tiny_vit, tiny_deit):
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    models = {m["model_id"]: m for m in requests.get(server.url + "/models", timeout=10).json()}
    assert models[VIT_NAME]["num_labels"] == 10 and models[VIT_NAME]["image_size"] == 32
    assert models[VIT_NAME]["default"] is True
    assert models[DEIT_NAME]["num_labels"] == 7 and models[DEIT_NAME]["default"] is False
    # A directory also answers to its directory name.
    assert models[VIT_NAME]["aliases"] == [tiny_vit.name] and models[DEIT_NAME]["aliases"] == [tiny_deit.name]


def test_inference_client_base_url_raw_bytes(server, lib_vit, cats):
    from huggingface_hub import InferenceClient

    out = InferenceClient(base_url=server.url).image_classification(cats)
    assert [{"label": o.label, "score": o.score} for o in out] == lib_vit.classify(cats)


@pytest.mark.parametrize("top_k, function_to_apply", [(3, None), (None, "sigmoid"), (7, "none"), (2, "softmax")])
def test_inference_client_parameters(server, lib_deit, examples_dir, coffee, top_k, function_to_apply):
    """With parameters huggingface_hub sends JSON with base64 inputs; given a path it sends image/jpeg."""
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=f"{server.url}/models/{DEIT_NAME}")
    out = client.image_classification(examples_dir / "coffee.jpg", top_k=top_k, function_to_apply=function_to_apply)
    expected = lib_deit.classify(coffee, top_k=top_k or 5, function_to_apply=function_to_apply)
    assert [{"label": o.label, "score": o.score} for o in out] == expected


def test_inference_client_router_path(server, lib_vit, cats):
    from huggingface_hub import InferenceClient

    out = InferenceClient(model=f"{server.url}/hf-inference/models/{VIT_NAME}").image_classification(cats, top_k=2)
    assert [{"label": o.label, "score": o.score} for o in out] == lib_vit.classify(cats, top_k=2)


@pytest.mark.parametrize("content_type", [None, "image/jpeg", "application/octet-stream", "text/plain"])
def test_raw_bytes_any_content_type(server, lib_vit, tiny_vit, cats, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    r = post(f"{server.url}/models/{tiny_vit.name}", data=cats, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == lib_vit.classify(cats)
    assert r.headers["x-compute-type"] == "cpu"
    seconds = r.headers["x-compute-time"]
    assert float(seconds) >= 0 and len(seconds.split(".")[1]) == 3
    assert r.headers["x-cache"] in ("hit", "miss")


def test_raw_bytes_without_content_type_header_at_all(server, lib_vit, coffee):
    """requests adds no Content-Type for a bytes body; check the request really had none."""
    prepared = requests.Request("POST", server.url + "/", data=coffee).prepare()
    assert "Content-Type" not in prepared.headers
    with requests.Session() as s:
        r = s.send(prepared, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200 and r.json() == lib_vit.classify(coffee)


def test_curl_data_binary(server, lib_deit, examples_dir, coffee):
    if shutil.which("curl") is None:
        r = post(f"{server.url}/models/{DEIT_NAME}", data=coffee,
                 headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 200 and r.json() == lib_deit.classify(coffee)
        return
    # curl --data-binary sends Content-Type: application/x-www-form-urlencoded.
    done = subprocess.run(["curl", "-sS", "--max-time", "60", "-w", "\n%{http_code}", "--data-binary",
                           f"@{examples_dir / 'coffee.jpg'}", f"{server.url}/models/{DEIT_NAME}"],
                          capture_output=True, text=True, timeout=90)
    body, _, status = done.stdout.rpartition("\n")
    assert status == "200", done.stdout + done.stderr
    assert json.loads(body) == lib_deit.classify(coffee)


def test_json_base64_inputs_and_image_alias(server, lib_vit, cats):
    r = post(server.url + "/", json={"inputs": b64(cats), "parameters": {"top_k": 4, "function_to_apply": "sigmoid"}})
    assert r.status_code == 200 and r.json() == lib_vit.classify(cats, top_k=4, function_to_apply="sigmoid")
    r = post(server.url + "/", json={"image": b64(cats)})
    assert r.status_code == 200 and r.json() == lib_vit.classify(cats)


def test_json_ignores_options_and_unknown_parameters(server, lib_vit, cats):
    payload = {"inputs": b64(cats), "parameters": {"top_k": 3, "threshold": 0.5, "other": [1]},
               "options": {"wait_for_model": True, "use_cache": False}}
    # JSON without a Content-Type (first byte "{") and with a data: URL prefix is understood as well.
    r = post(server.url + "/", data=json.dumps(payload).encode())
    assert r.status_code == 200 and r.json() == lib_vit.classify(cats, top_k=3)
    r = post(server.url + "/", json={"inputs": "data:image/jpeg;base64," + b64(cats)})
    assert r.status_code == 200 and r.json() == lib_vit.classify(cats)


def test_top_k_above_label_count_returns_every_label(server, lib_vit, cats):
    r = post(server.url + "/", json={"inputs": b64(cats), "parameters": {"top_k": 1000}})
    assert r.status_code == 200 and len(r.json()) == 10 and r.json() == lib_vit.classify(cats, top_k=1000)


# --------------------------------------------------------------------------- cache


def test_result_cache_hit_miss_and_bypass(server, lib_vit):
    image = png_bytes(40, 30, seed=int(time.time_ns() % 2**31))  # unseen by this server
    expected = lib_vit.classify(image, top_k=3)
    assert post(server.url + "/", data=image, headers={"Content-Type": "image/png"}).headers["x-cache"] == "miss"
    r = post(server.url + "/", json={"inputs": b64(image), "parameters": {"top_k": 3}})
    assert r.headers["x-cache"] == "miss"  # other parameters, other entry
    assert r.json() == expected
    r = post(server.url + "/", json={"inputs": b64(image), "parameters": {"top_k": 3}})
    assert r.headers["x-cache"] == "hit" and r.json() == expected
    r = post(server.url + "/", json={"inputs": b64(image), "parameters": {"top_k": 3}},
             headers={"x-use-cache": "false"})
    assert r.headers["x-cache"] == "miss" and r.json() == expected
    assert post(server.url + "/", data=image).headers["x-cache"] == "hit"
    # Another model, same bytes: another entry.
    assert post(f"{server.url}/models/{DEIT_NAME}", data=image).headers["x-cache"] == "miss"


# --------------------------------------------------------------------------- batching


def test_concurrent_batch_with_corrupt_images(server, lib_vit, cats, coffee):
    good = [(cats, 5, None), (coffee, 3, "sigmoid"), (cats, 2, "none"), (coffee, 5, None),
            (cats, 4, "softmax"), (coffee, 1, None)]
    bad = [b"\xff\xd8\xff\xe0 definitely not a jpeg", cats[: len(cats) // 2]]
    headers = {"x-use-cache": "false"}

    def send(item):
        if isinstance(item, bytes):
            return post(server.url + "/", data=item, headers=headers)
        image, top_k, fn = item
        params = {"top_k": top_k} | ({"function_to_apply": fn} if fn else {})
        return post(server.url + "/", json={"inputs": b64(image), "parameters": params}, headers=headers)

    items = good[:3] + [bad[0]] + good[3:] + [bad[1]]
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        responses = list(pool.map(send, items))
    for item, r in zip(items, responses):
        if isinstance(item, bytes):
            assert_error(r, 400)
        else:
            image, top_k, fn = item
            assert r.status_code == 200, r.text
            assert r.json() == lib_vit.classify(image, top_k=top_k, function_to_apply=fn)


# --------------------------------------------------------------------------- errors: 400


@pytest.mark.parametrize("body, content_type, fragment", [
    (b"this is not an image", None, "not an image"),
    (b'{"inputs": "not base64 !!!"}', "application/json", "base64"),
    (b'{"inputs": ', "application/json", "JSON"),
    (b'{"parameters": {"top_k": 2}}', "application/json", "inputs"),
    (b'{"inputs": 42}', "application/json", "inputs"),
    (b'{"inputs": "https://example.com/cat.jpg"}', "application/json", "URL"),
    (b'["a", "list"]', "application/json", "object"),
    (b"", None, "empty"),
])
def test_bad_body_is_400(server, body, content_type, fragment):
    headers = {"Content-Type": content_type} if content_type else {}
    assert fragment.lower() in assert_error(post(server.url + "/", data=body, headers=headers), 400)["error"].lower()


def test_truncated_image_is_400(server, cats):
    error = assert_error(post(server.url + "/", data=cats[: len(cats) * 2 // 3]), 400)["error"]
    assert "truncated" in error or "corrupt" in error


def test_decompression_bomb_is_400(server):
    # 1200 x 1000 = 1.2 MP, over the server's --max-image-pixels 1000000; a flat PNG that is only a few KB.
    bomb = png_bytes(1200, 1000)
    assert len(bomb) < 100_000
    assert "too large" in assert_error(post(server.url + "/", data=bomb), 400)["error"]


@pytest.mark.parametrize("parameters, fragment", [
    ({"top_k": 0}, "top_k"), ({"top_k": -3}, "top_k"), ({"top_k": "five"}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"), ({"function_to_apply": "relu"}, "function_to_apply"),
    ({"function_to_apply": 3}, "function_to_apply"),
])
def test_bad_parameters_are_400(server, cats, parameters, fragment):
    r = post(server.url + "/", json={"inputs": b64(cats), "parameters": parameters})
    assert fragment in assert_error(r, 400)["error"]


def test_parameters_must_be_an_object(server, cats):
    assert_error(post(server.url + "/", json={"inputs": b64(cats), "parameters": [1, 2]}), 400)


def test_bad_header_flag_is_400(server, cats):
    assert_error(post(server.url + "/", data=cats, headers={"x-use-cache": "perhaps"}), 400)


# --------------------------------------------------------------------------- errors: 404, 405, 413, 500


@pytest.mark.parametrize("model", ["nobody/no-such-model", "not..valid", "local-org/local-vit", "bundled:nope"])
def test_unknown_model_is_404(server, cats, model):
    assert_error(post(f"{server.url}/models/{model}", data=cats), 404)
    assert_error(post(f"{server.url}/hf-inference/models/{model}", data=cats), 404)
    assert_error(post(f"{server.url}/models/{model}", data=cats, headers={"x-wait-for-model": "true"}), 404)


def test_unknown_model_without_load_on_demand_is_404(guarded_server, cats):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert "not loaded" in assert_error(post(f"{guarded_server.url}/models/{ON_DEMAND_ID}", data=cats,
                                             headers=auth), 404)["error"]


@pytest.mark.parametrize("args, env, fragment", [
    (["--model", "/nonexistent/checkpoint-dir"], {}, "cannot load"),
    (["--load-on-demand", "--token-env", "VITNP_TEST_UNSET_VARIABLE"], {}, "VITNP_TEST_UNSET_VARIABLE"),
    ([], {}, "--model"),
    (["--model", "bundled:digits", "--model", "bundled:digits"], {}, "both named 'bundled:digits'"),
])
def test_serve_refuses_to_start(args, env, fragment):
    done = subprocess.run([sys.executable, "-m", "vitnp", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", **env))
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_url_model_ids_are_never_paths(server, cats, tiny_vit):
    """Percent-encoded traversal and absolute paths reach the router as-is; none may load a directory."""
    for raw_path in [f"/models/..%2F..%2F{tiny_vit.name}", "/models/%2Fetc%2Fpasswd",
                     f"/models/{str(tiny_vit).lstrip('/')}", "/models/..", "/models/../local-org/local-vit"]:
        head = f"POST {raw_path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(cats)}\r\nConnection: close\r\n\r\n"
        status, reply = raw_request(server.port, head.encode(), cats)
        assert status in (400, 404), (raw_path, reply[:300])
    names = {m["model_id"] for m in requests.get(server.url + "/models", timeout=10).json()}
    assert names <= {VIT_NAME, DEIT_NAME, ON_DEMAND_ID}, names


def test_unknown_route_and_method_are_json(server):
    assert_error(requests.get(server.url + "/nothing-here", timeout=10), 404)
    assert_error(requests.get(f"{server.url}/models/{VIT_NAME}", timeout=10), 405)


def test_body_over_limit_is_413(server, cats):
    big = cats + os.urandom(1_500_000)  # the server's limit is 1 MB
    assert "1 MB" in assert_error(post(server.url + "/", data=big), 413)["error"]
    payload = json.dumps({"inputs": b64(cats + os.urandom(900_000))}).encode()  # 1.25 MB of base64
    assert_error(post(server.url + "/", data=payload, headers={"Content-Type": "application/json"}), 413)
    # A body just under the limit is read in full (and then refused as a non-image, not as too large).
    assert_error(post(server.url + "/", data=os.urandom(1_000_000)), 400)


def test_slow_client_times_out_without_holding_the_engine(server, lib_vit, cats):
    """A client that stops sending its body gets 408 after --body-timeout (3 s); others are served meanwhile."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as slow:
        slow.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(cats)}\r\n\r\n".encode() + cats[:1000])
        r = post(server.url + "/", data=cats, headers={"x-use-cache": "false"})
        assert r.status_code == 200 and r.json() == lib_vit.classify(cats)
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
    assert int(reply.split(b" ", 2)[1]) == 408, reply
    assert b"not received within 3 seconds" in reply


def test_worker_forward_pass_matches_the_library(lib_vit, cats, coffee):
    """The batching worker's public interface (what the engine thread and Ray Serve's @serve.batch both call):
    one forward pass over several jobs, each with its own parameters, answers as the library does."""
    from vitnp.batching import Job, ModelWorker
    from vitnp.options import ServingOptions

    worker = ModelWorker("tiny", lib_vit, ServingOptions(max_batch_size=4, max_queue=3))
    items = [(cats, 3, None), (coffee, 5, "sigmoid"), (cats, 1, "none")]
    jobs = [Job(worker.decode(image), top_k, fn) for image, top_k, fn in items]
    for _ in jobs:
        worker.admit()
    assert worker.waiting == 3
    with pytest.raises(vitnp.errors.QueueFullError):
        worker.admit()
    worker.leave_queue(len(jobs))
    assert worker.waiting == 0
    assert worker.forward(jobs) == [lib_vit.classify(image, top_k=top_k, function_to_apply=fn)
                                    for image, top_k, fn in items]


def test_non_finite_scores_are_a_500_with_their_reason_per_request(tmp_path, tiny_vit, lib_vit, cats, coffee):
    """A model whose weights overflow float32 on an image: that request gets a 500 saying so (JSON cannot carry
    NaN scores), not the generic one with a traceback in the log; the server goes on serving.  In a batch the
    error is each job's own result, next to the other jobs' predictions."""
    from checkpoints import make_overflowing_copy
    from vitnp.batching import Job, ModelWorker
    from vitnp.options import ServingOptions

    overflowing = make_overflowing_copy(tiny_vit, tmp_path / "overflowing")
    worker = ModelWorker("overflowing", vitnp.load(overflowing, backend=BACKEND), ServingOptions(max_batch_size=2))
    # Every logit is +inf: softmax (the default) gives NaN, sigmoid gives 1.0.
    softmax, sigmoid = worker.forward([Job(worker.decode(cats), 3, None), Job(worker.decode(coffee), 5, "sigmoid")])
    assert isinstance(softmax, vitnp.errors.NonFiniteScoresError)
    assert len(sigmoid) == 5 and all(p["score"] == 1.0 for p in sigmoid)

    proc = ServerProcess(["--model", f"overflowing={overflowing}", "--model", f"{VIT_NAME}={tiny_vit}"],
                         tmp_path / "server.log", env={"HF_HUB_OFFLINE": "1", "VITNP_API_TOKEN": ""})
    try:
        body = assert_error(post(f"{proc.url}/models/overflowing", data=cats), 500)
        assert "scores are not finite numbers" in body["error"]
        r = post(f"{proc.url}/models/{VIT_NAME}", data=cats)
        assert r.status_code == 200 and r.json() == lib_vit.classify(cats)
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()


def test_internal_errors_are_generic_500_and_logged(caplog):
    from vitnp.server import GENERIC_500, error_for

    with caplog.at_level("ERROR", logger="vitnp.server"):
        response = error_for(RuntimeError("secret internal detail /srv/models"))
    assert response.status_code == 500
    body = json.loads(response.body)
    assert body == {"error": GENERIC_500}
    assert "secret internal detail" in caplog.text and "RuntimeError" in caplog.text


# --------------------------------------------------------------------------- on-demand loading: 503


def test_on_demand_model_503_then_wait_for_model(server, lib_vit, cats):
    """An explicit x-wait-for-model: false gets the protocol's immediate 503; true (as no header) waits."""
    url = f"{server.url}/models/{ON_DEMAND_ID}"
    r = post(url, data=cats, headers={"x-wait-for-model": "false"})
    body = assert_error(r, 503)
    assert body["error"] == f"Model {ON_DEMAND_ID} is currently loading"
    assert isinstance(body["estimated_time"], (int, float)) and body["estimated_time"] > 0
    assert int(r.headers["Retry-After"]) >= 1
    r = post(url, data=cats, headers={"x-wait-for-model": "true"})
    assert r.status_code == 200, r.text
    assert r.json() == lib_vit.classify(cats)
    r = post(f"{server.url}/hf-inference/models/{ON_DEMAND_ID}", json={"inputs": b64(cats), "parameters": {"top_k": 2}})
    assert r.status_code == 200 and r.json() == lib_vit.classify(cats, top_k=2)
    models = {m["model_id"]: m for m in requests.get(server.url + "/models", timeout=10).json()}
    assert models[ON_DEMAND_ID]["status"] == "loaded" and models[ON_DEMAND_ID]["num_labels"] == 10


def test_no_503_for_startup_models(server, cats):
    # Models named on the command line were loaded before the port opened.
    assert post(f"{server.url}/models/{DEIT_NAME}", data=cats).status_code == 200


# --------------------------------------------------------------------------- auth: 401, queue: 429


def test_token_required(guarded_server, lib_vit, cats):
    url = guarded_server.url + "/"
    r = post(url, data=cats)
    assert_error(r, 401)
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_error(post(url, data=cats, headers={"Authorization": "Bearer wrong-token"}), 401)
    assert_error(post(url, data=cats, headers={"Authorization": f"Bearer {TOKEN}x"}), 401)
    assert_error(post(url, data=cats, headers={"Authorization": TOKEN}), 401)
    assert_error(requests.get(guarded_server.url + "/models", timeout=10), 401)
    assert requests.get(guarded_server.url + "/health", timeout=10).status_code == 200
    r = post(url, data=cats, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json() == lib_vit.classify(cats)


def test_inference_client_with_token(guarded_server, lib_vit, cats):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    out = InferenceClient(base_url=guarded_server.url, token=TOKEN).image_classification(cats, top_k=3)
    assert [{"label": o.label, "score": o.score} for o in out] == lib_vit.classify(cats, top_k=3)
    with pytest.raises(HfHubHTTPError) as info:
        InferenceClient(base_url=guarded_server.url, token="wrong").image_classification(cats)
    assert info.value.response.status_code == 401


def queued(server: ServerProcess) -> int:
    models = requests.get(server.url + "/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
    return sum(m.get("queued", 0) for m in models)


def wait_for_queued(server: ServerProcess, n: int) -> None:
    for _ in range(600):
        if queued(server) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server never had {n} queued requests")


def test_full_queue_is_429(guarded_server, lib_vit, cats):
    """Queue of 2, batches wait 4 s to fill: two requests wait in the queue, the next ones get 429."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(post, guarded_server.url + "/", data=cats, headers=auth | {"x-use-cache": "false"})
                   for _ in range(2)]
        wait_for_queued(guarded_server, 2)
        r = post(guarded_server.url + "/", data=cats, headers=auth | {"x-use-cache": "false"})
        assert_error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
        for f in waiting:
            assert f.result().status_code == 200 and f.result().json() == lib_vit.classify(cats)


def test_burst_larger_than_queue(guarded_server, lib_vit, coffee):
    auth = {"Authorization": f"Bearer {TOKEN}", "x-use-cache": "false"}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(guarded_server.url + "/", data=coffee, headers=auth), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses and 200 in statuses
    for r in responses:
        if r.status_code == 200:
            assert r.json() == lib_vit.classify(coffee)
        else:
            assert_error(r, 429)


# --------------------------------------------------------------------------- graceful shutdown


def test_sigterm_drains_in_flight_requests(tmp_path, tiny_vit, lib_vit, cats, coffee):
    """Three requests wait in one batch (5 s to fill), a corrupt one fails alone; SIGTERM; all finish."""
    proc = ServerProcess(["--model", str(tiny_vit), "--max-batch-size", "8", "--max-wait-ms", "5000",
                          "--token-env", TOKEN_ENV], tmp_path / "drain.log", env={TOKEN_ENV: TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        items = [(cats, 5), (coffee, 3), (cats, 1)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, proc.url + "/", json={"inputs": b64(img), "parameters": {"top_k": k}},
                                   headers=auth) for img, k in items]
            corrupt = pool.submit(post, proc.url + "/", data=b"GIF89a broken", headers=auth)
            assert_error(corrupt.result(), 400)
            wait_for_queued(proc, 3)
            proc.proc.send_signal(signal.SIGTERM)
            for (img, k), f in zip(items, futures):
                r = f.result()
                assert r.status_code == 200, r.text
                assert r.json() == lib_vit.classify(img, top_k=k)
        # uvicorn re-raises the SIGTERM once it has shut down cleanly, so the exit status is -SIGTERM.
        assert proc.proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.log()
        assert "Application shutdown complete" in log, log
        # The three were answered by one forward pass.
        assert log.count("status=200 batch=3") == 3, log
    finally:
        proc.stop()


def test_access_log_lines(server, tiny_vit, cats):
    post(f"{server.url}/models/{tiny_vit.name}", data=cats, headers={"x-use-cache": "false"})
    path = f'"POST /models/{tiny_vit.name}"'
    lines = [line for line in server.log().splitlines() if "vitnp.access" in line and path in line]
    assert lines
    assert f"model={VIT_NAME} status=200 batch=" in lines[-1] and "latency=" in lines[-1]


def test_bench_server_smoke(tmp_path, tiny_vit):
    """benchmarks/bench_server.py runs end to end on a tiny checkpoint (no timing is checked)."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_server.py"
    done = subprocess.run([sys.executable, str(bench), "--no-reexec", "--quick", "--model", str(tiny_vit),
                           "--clients", "1,3", "--engine-reps", "1", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "server-quick.json").read_text())
    for clients in ("1", "3"):
        run = data["server"][clients]
        assert run["failures"] == 0 and run["requests"] == 2 * int(clients) and run["images_per_s"] > 0
    assert data["engine"]["batch8"]["images_per_s"] > 0 and data["target"]["ratio"] is None
    # Every request (2 per client) and every warm-up (1 per client) went through a forward pass.
    forwards = {size: n for size, n in data["server_batches"].items() if size != "-"}
    assert sum(forwards.values()) == 3 * (1 + 3)


def test_bundled_digits_model_over_http(tmp_path, examples_dir):
    """The offline demo model: the server names each shipped digit as its file name says, like the library."""
    proc = ServerProcess(["--model", "bundled:digits"], tmp_path / "digits-server.log", env={"HF_HUB_OFFLINE": "1"})
    try:
        lib = vitnp.load("bundled:digits", backend=BACKEND)
        pngs = sorted((examples_dir / "digits").glob("digit-*.png"))
        assert len(pngs) == 10
        for png in pngs:
            for url in (proc.url + "/", proc.url + "/models/bundled:digits"):
                response = post(url, data=png.read_bytes())
                assert response.status_code == 200, response.text
                assert response.json()[0]["label"] == png.name.split("-")[1]
                assert response.json() == lib.classify(png)
    finally:
        proc.stop()
