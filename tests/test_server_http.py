"""The HTTP layer's production features, against real `python -m vitnp serve` processes on 127.0.0.1.

Two servers for the whole module: `server` (bundled:digits and an on-demand Hub model from an offline cache,
JSON logs, CORS on, short connection timeouts) and `plain` (text logs, no CORS, slow batches and a small
connection cap: the SIGTERM drain, which ends it, runs last).  Answers are compared with the library
(vitnp.load(...).classify) on the same checkpoint and backend.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import vitnp
from checkpoints import fill_hub_cache
from test_server import BACKEND, REQUEST_TIMEOUT_S, STARTUP_TIMEOUT_S, ServerProcess

DIGITS = "bundled:digits"
ON_DEMAND_ID = "test-org/loading-vit"
ORIGIN = "https://app.example.com"
FORGED = "2026-01-01 00:00:00,000 INFO vitnp.access: forged"
HEADER_TIMEOUT_S = 2
SOCKET_TIMEOUT_S = 60
MAX_CONNECTIONS = 6


class ProbedServerProcess(ServerProcess):
    """A ServerProcess that records what its readiness probe answered while it started."""

    def _wait_until_up(self) -> None:
        self.probes: list[tuple[int, dict]] = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = requests.get(self.url + "/health/ready", timeout=5)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            self.probes.append((r.status_code, r.json()))
            if r.status_code == 200:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start within {STARTUP_TIMEOUT_S}s:\n{self.log()}")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_vit) -> Path:
    cache = tmp_path_factory.mktemp("hub-cache-http")
    fill_hub_cache(cache, ON_DEMAND_ID, tiny_vit)
    return cache


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub_cache):
    log_path = tmp_path_factory.mktemp("logs") / "http-server.log"
    proc = ProbedServerProcess(
        ["--model", DIGITS, "--load-on-demand", "--log-format", "json", "--cors-allow-origin", ORIGIN,
         "--cors-allow-origin", "http://localhost:3000", "--header-timeout", str(HEADER_TIMEOUT_S),
         "--keep-alive-timeout", str(HEADER_TIMEOUT_S), "--max-wait-ms", "20", "--load-timeout", "600"],
        log_path, env={"HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "VITNP_API_TOKEN": ""})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "plain-server.log"
    proc = ServerProcess(["--model", DIGITS, "--max-batch-size", "8", "--max-wait-ms", "4000",
                          "--max-connections", str(MAX_CONNECTIONS)],
                         log_path, env={"HF_HUB_OFFLINE": "1", "VITNP_API_TOKEN": ""})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def digits():
    return vitnp.load(DIGITS, backend=BACKEND)


@pytest.fixture(scope="module")
def lib_vit(tiny_vit):
    return vitnp.load(tiny_vit, backend=BACKEND)


@pytest.fixture(scope="module")
def three(examples_dir) -> bytes:
    return next((examples_dir / "digits").glob("digit-3-*.png")).read_bytes()


@pytest.fixture(scope="module")
def seven(examples_dir) -> bytes:
    return next((examples_dir / "digits").glob("digit-7-*.png")).read_bytes()


def post(url: str, **kwargs) -> requests.Response:
    return requests.post(url, timeout=REQUEST_TIMEOUT_S, **kwargs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["error"], str) and "Traceback" not in response.text
    return body["error"]


def access_lines(proc: ServerProcess) -> list[dict]:
    """The JSON server's access-log lines."""
    return [entry for entry in map(json.loads, proc.log().splitlines()) if entry["logger"] == "vitnp.access"]


def access_line(proc: ServerProcess, request_id: str) -> dict:
    """The access line of one request (written just after its answer: allow a moment)."""
    for _ in range(100):
        found = [entry for entry in access_lines(proc) if entry.get("request_id") == request_id]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for request {request_id}")


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes on a fresh connection, read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


# --------------------------------------------------------------------------- bodies and parameters


def test_js_snippet_raw_bytes_sent_as_json(server, digits, three):
    """The protocol page's JavaScript example: fetch(url, {body: imageBytes, headers: {"Content-Type":
    "application/json"}})."""
    r = post(server.url + "/", data=three, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json() == digits.classify(three)


def test_body_neither_json_nor_image_says_both(server):
    error = error_of(post(server.url + "/", data=b'{"inputs": ', headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in error and "image" in error


def test_list_inputs_answer_a_list_of_lists(server, digits, three, seven):
    r = post(f"{server.url}/models/{DIGITS}", json={"inputs": [b64(three), b64(seven), b64(three)],
                                                     "parameters": {"top_k": 2}}, headers={"x-use-cache": "false"})
    assert r.status_code == 200, r.text
    assert r.json() == [digits.classify(three, top_k=2), digits.classify(seven, top_k=2),
                        digits.classify(three, top_k=2)]
    assert access_line(server, r.headers["x-request-id"])["images"] == 3
    # A single-element list is still a list of lists; a bad element names itself.
    r = post(server.url + "/", json={"inputs": [b64(seven)]})
    assert r.status_code == 200 and r.json() == [digits.classify(seven)]
    assert '"inputs"[1]' in error_of(post(server.url + "/", json={"inputs": [b64(seven), 7]}), 400)
    assert "empty" in error_of(post(server.url + "/", json={"inputs": []}), 400)


def test_query_string_parameters(server, digits, three):
    r = post(server.url + "/?top_k=3&function_to_apply=sigmoid", data=three, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json() == digits.classify(three, top_k=3, function_to_apply="sigmoid")
    # JSON parameters win over the query's, parameter by parameter.
    r = post(server.url + "/?top_k=4&function_to_apply=sigmoid", json={"inputs": b64(three),
                                                                       "parameters": {"top_k": 2}})
    assert r.status_code == 200 and r.json() == digits.classify(three, top_k=2, function_to_apply="sigmoid")
    assert "top_k" in error_of(post(server.url + "/?top_k=many", data=three), 400)
    assert "function_to_apply" in error_of(post(server.url + "/?function_to_apply=relu", data=three), 400)


def test_wait_for_model_header_and_legacy_option(server, lib_vit, three):
    url = f"{server.url}/models/{ON_DEMAND_ID}"
    image = b64(three)
    # An explicit x-wait-for-model: false gets the immediate 503 (and wins over the body's option).
    r = post(url, json={"inputs": image, "options": {"wait_for_model": True}}, headers={"x-wait-for-model": "false"})
    assert error_of(r, 503) == f"Model {ON_DEMAND_ID} is currently loading"
    assert r.json()["estimated_time"] > 0 and int(r.headers["Retry-After"]) >= 1
    # The legacy body option waits for the load.
    r = post(url, json={"inputs": image, "options": {"wait_for_model": True}})
    assert r.status_code == 200, r.text
    assert r.json() == lib_vit.classify(three)
    assert "wait_for_model" in error_of(post(url, json={"inputs": image, "options": {"wait_for_model": "soon"}}),
                                        400)
    assert "x-wait-for-model" in error_of(post(url, data=three, headers={"x-wait-for-model": "maybe"}), 400)


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize("depth", [40, 2000, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    for body in ('{"inputs": ' + "[" * depth + "]" * depth + "}", '{"a":' * depth + "1" + "}" * depth):
        r = post(server.url + "/", data=body.encode(), headers={"Content-Type": "application/json"})
        assert "nested deeper than" in error_of(r, 400)
    # Never closed: not JSON (so not an image either), or too deep to tell.
    r = post(server.url + "/", data=b"[" * depth, headers={"Content-Type": "application/json"})
    assert "JSON" in error_of(r, 400)


def test_huge_numbers_are_400(server, three):
    digits_5000 = "9" * 5000
    body = f'{{"inputs": "{b64(three)}", "parameters": {{"top_k": {digits_5000}}}}}'
    assert "number" in error_of(post(server.url + "/", data=body.encode()), 400)
    body = f'{{"inputs": "{b64(three)}", "parameters": {{"top_k": 1.{digits_5000}e5}}}}'
    assert "number" in error_of(post(server.url + "/", data=body.encode()), 400)
    assert "top_k" in error_of(post(f"{server.url}/?top_k={digits_5000}", data=three), 400)


def test_control_characters_never_start_a_log_line(server, plain, three):
    """A %0a in the path (and other control characters) cannot write a line of its own into the log."""
    for proc in (server, plain):
        for path in ["/%0a" + FORGED.replace(" ", "%20"), "/models/x%0d%0a" + FORGED.replace(" ", "%20"),
                     "/%1b[31m%e2%80%a8" + FORGED.replace(" ", "%20")]:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(three)}\r\nConnection: close\r\n\r\n"
            reply = raw_exchange(proc.port, head.encode() + three)
            assert reply.startswith(b"HTTP/1.1 4"), reply[:200]
        time.sleep(0.3)
        lines = proc.log().splitlines()
        assert not [line for line in lines if line.startswith(FORGED) or line.startswith("2026-01-01")]
        assert [line for line in lines if "\\n" + FORGED in line]


# --------------------------------------------------------------------------- request ids and logs


def test_request_id_echoed_and_logged(server, three):
    r = post(server.url + "/", data=three, headers={"x-request-id": "client-id-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-42"
    line = access_line(server, "client-id-42")
    assert line["status"] == 200 and line["model"] == DIGITS and line["images"] == 1
    assert line["route"] == "/" and line["cache"] in ("hit", "miss") and line["latency"] >= 0
    assert isinstance(line["batch"], int)


def test_request_id_generated_on_every_response(server, three):
    responses = [requests.get(server.url + "/nothing-here", timeout=10),
                 requests.get(f"{server.url}/models/{DIGITS}", timeout=10),
                 requests.get(server.url + "/health/live", timeout=10),
                 post(server.url + "/", data=b"not an image"),
                 post(server.url + "/", data=three),
                 # Not echoed: a space and a control character, and an over-long id.
                 post(server.url + "/", data=three, headers={"x-request-id": "has space\tand tab"}),
                 post(server.url + "/", data=three, headers={"x-request-id": "x" * 200})]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids)
    for r, rid in zip(responses, ids):
        assert len(rid) == 32 and int(rid, 16) >= 0, rid
        assert access_line(server, rid)["status"] == r.status_code
    assert access_line(server, ids[0])["route"] == "unmatched"


def test_every_log_line_is_json(server):
    lines = server.log().splitlines()
    assert len(lines) > 5
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    access = access_lines(server)
    assert access and all({"request_id", "model", "status", "latency", "images", "batch", "cache"} <= set(entry)
                          for entry in access)


def test_text_log_lines_carry_the_request_id(plain, three):
    r = post(plain.url + "/", data=three, headers={"x-request-id": "text-log-id-1"})
    assert r.status_code == 200
    time.sleep(0.3)
    lines = [line for line in plain.log().splitlines() if "[text-log-id-1]" in line]
    assert len(lines) == 1 and "vitnp.access [text-log-id-1]" in lines[0]
    assert f"model={DIGITS} status=200 batch=" in lines[0] and "images=1" in lines[0]


# --------------------------------------------------------------------------- CORS


def test_cors_preflight_and_simple_request(server, three):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization, x-wait-for-model"}
    r = requests.options(f"{server.url}/models/{DIGITS}", headers=preflight, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-wait-for-model" in r.headers["access-control-allow-headers"].lower()
    r = post(server.url + "/", data=three, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # An origin that was not allowed gets no CORS headers.
    r = requests.options(server.url + "/", headers=preflight | {"Origin": "https://evil.example"}, timeout=10)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_cors_is_off_by_default(plain, three):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    r = requests.options(plain.url + "/", headers=preflight, timeout=10)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    r = post(plain.url + "/", data=three, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# --------------------------------------------------------------------------- documents


def test_endpoint_info_through_inference_client(server):
    """huggingface_hub refuses every URL, even a local one, when HF_HUB_OFFLINE is set: the client runs in a
    process without it.  get_endpoint_info needs the client's provider to be "hf-inference" (the protocol this
    server speaks); without one it raises before sending anything."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import json, sys\nfrom huggingface_hub import InferenceClient\n"
            "client = InferenceClient(base_url=sys.argv[1], provider='hf-inference')\n"
            "print(json.dumps(client.get_endpoint_info()))")
    done = subprocess.run([sys.executable, "-c", code, server.url], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info == requests.get(server.url + "/info", timeout=10).json()
    assert info["model_id"] == DIGITS and info["version"] == vitnp.__version__
    assert DIGITS in [m["model_id"] for m in info["models"]]


def test_openapi_document_is_valid_and_complete(server):
    from openapi_spec_validator import validate

    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    validate(doc)
    assert doc["info"]["version"] == vitnp.__version__
    for path, item in doc["paths"].items():
        url = server.url + path.replace("{model_id}", DIGITS)
        for method in item:
            if method == "get":
                assert requests.get(url, timeout=30).status_code == 200, path
            else:  # every POST route classifies
                assert post(url, data=b"").status_code == 400, path
    classify = doc["paths"]["/models/{model_id}"]["post"]
    assert {p.get("name") for p in classify["parameters"]} >= {"top_k", "function_to_apply", "x-wait-for-model"}
    assert {"400", "401", "404", "413", "429", "503"} <= set(classify["responses"])
    assert "application/json" in classify["requestBody"]["content"]
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and "estimated_time" in error["properties"]


def test_root_says_what_this_is(server):
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200
    root = r.json()
    assert root["name"] == "vitnp" and root["version"] == vitnp.__version__
    assert requests.get(server.url + root["docs"], timeout=10).json()["openapi"].startswith("3.")


# --------------------------------------------------------------------------- metrics and probes


def metric_samples(proc: ServerProcess) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(proc.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_move_with_requests(server, three, seven):
    route = "/models/{model_id}"
    ok = ("vitnp_requests_total", (("model", DIGITS), ("route", route), ("status", "200")))
    images = ("vitnp_images_classified_total", (("model", DIGITS),))
    before = metric_samples(server)
    url = f"{server.url}/models/{DIGITS}"
    for image in (three, seven):
        assert post(url, data=image, headers={"x-use-cache": "false"}).status_code == 200
    assert post(url, json={"inputs": [b64(three), b64(seven)]}, headers={"x-use-cache": "false"}).status_code == 200
    assert post(url, data=b"not an image").status_code == 400
    after = metric_samples(server)
    assert after[ok] - before.get(ok, 0) == 3
    assert after[images] - before.get(images, 0) == 4
    bad = ("vitnp_requests_total", (("model", DIGITS), ("route", route), ("status", "400")))
    assert after[bad] - before.get(bad, 0) == 1
    # Only route templates label the series, never a raw path.
    routes = {dict(labels).get("route") for name, labels in after if name == "vitnp_requests_total"}
    assert routes and all(r in ("/", route, "unmatched") or r.startswith(("/health", "/info", "/metrics",
                          "/openapi", "/models", "/hf-inference")) for r in routes), routes
    assert not any("forged" in r or DIGITS in r for r in routes)


def test_probes_while_loading_and_ready(server):
    statuses = [status for status, _ in server.probes]
    assert statuses[-1] == 200 and server.probes[-1][1] == {"status": "ready"}
    # The port opened before the model was loaded: readiness said what it was waiting for.
    loading = [body for status, body in server.probes if status == 503]
    assert loading and all(body["status"] == "unavailable" and "loading" in body["reason"] for body in loading)
    assert requests.get(server.url + "/health/live", timeout=10).json() == {"status": "ok"}
    assert requests.get(server.url + "/health", timeout=10).json() == {"status": "ok"}


# --------------------------------------------------------------------------- connections


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection (rather than the read timing out)."""
    sock.settimeout(SOCKET_TIMEOUT_S)
    try:
        while sock.recv(65536):
            pass
    except socket.timeout:
        return False
    except ConnectionResetError:
        pass
    return True


def test_idle_and_half_sent_connections_are_cut(server):
    with socket.create_connection(("127.0.0.1", server.port)) as idle, \
            socket.create_connection(("127.0.0.1", server.port)) as half:
        half.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        assert closed_by_server(half)
        assert closed_by_server(idle)
    # A keep-alive connection is cut after its idle time too, and one that starts its next request's head
    # and stops.
    with socket.create_connection(("127.0.0.1", server.port)) as keep, \
            socket.create_connection(("127.0.0.1", server.port)) as second:
        for s in (keep, second):
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        second.sendall(b"GET /health/live HTTP/1.1\r\nHo")
        assert closed_by_server(keep)
        assert closed_by_server(second)
    # A whole request is still answered.
    assert requests.get(server.url + "/health/live", timeout=10).status_code == 200


def test_connection_cap(plain):
    sockets = [socket.create_connection(("127.0.0.1", plain.port)) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.2)  # let the server accept them
    try:
        assert requests.get(plain.url + "/health/live", timeout=10).status_code == 503
    finally:
        for s in sockets:
            s.close()
    for _ in range(100):
        if requests.get(plain.url + "/health/live", timeout=10).status_code == 200:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the server still refuses requests after the connections closed")


def test_sigterm_readiness_off_while_in_flight_requests_finish(plain, digits, three, seven):
    """Runs last on `plain`: a request waits for its batch to fill (4 s); SIGTERM; readiness answers 503 on a
    new connection while the request still completes; then the server exits."""
    assert requests.get(plain.url + "/health/ready", timeout=10).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(post, plain.url + "/", json={"inputs": [b64(three), b64(seven)]},
                           headers={"x-use-cache": "false"})
        for _ in range(600):
            if sum(m.get("queued", 0) for m in requests.get(plain.url + "/models", timeout=10).json()) == 2:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the request never queued")
        plain.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = requests.get(plain.url + "/health/ready", timeout=10)
        assert ready.status_code == 503 and "draining" in ready.json()["reason"]
        assert requests.get(plain.url + "/health/live", timeout=10).status_code == 200
        r = slow.result()
    assert r.status_code == 200 and r.json() == [digits.classify(three), digits.classify(seven)]
    assert plain.proc.wait(60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in plain.log()


# --------------------------------------------------------------------------- without a server


def test_log_escape_and_formats():
    from vitnp import logs

    assert logs.escape("a\nb\r\x1b[0m\u2028\x85ok") == "a\\nb\\r\\x1b[0m\\u2028\\x85ok"
    assert logs.escape("plain ünïcode / path") == "plain ünïcode / path"


def test_parse_body_rules():
    from vitnp.server import HTTPError, parse_body

    png = b"\x89PNG\r\n\x1a\n rest"
    assert parse_body(png, "application/json").images == [png]
    assert parse_body(b"[1, 2", "").not_json is not None
    parsed = parse_body(json.dumps({"inputs": [b64(png)], "parameters": {"top_k": 3},
                                    "options": {"use_cache": False}}).encode(), "")
    assert parsed.images == [png] and parsed.listed and parsed.top_k == 3 and parsed.use_cache is False
    with pytest.raises(HTTPError, match="nested deeper"):
        parse_body(b"[" * 50 + b"]" * 50, "application/json")
