"""The serving side below HTTP (vitnp.batching.InferenceService, vitnp.registry, vitnp.metrics), in-process:
unknown and broken models fail fast with their own errors and are remembered, models that load are waited
for, list inputs count per image against the queue, a queued request is dropped at its deadline, readiness
follows the startup models, and the metrics move with the requests.

Hub lookups go to a fake Hub on 127.0.0.1 (huggingface_hub's endpoint points at it): it answers "no such
repository", fails with 503, or holds a lookup until the test lets it go, and counts the lookups it saw.
Answers are compared with the library on the same checkpoint (backend numba: batch-size independent).
"""

from __future__ import annotations

import asyncio
import json
import http.server
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import vitnp
from checkpoints import fill_hub_cache
from vitnp.batching import InferenceService
from vitnp.errors import (
    DeadlineExceededError,
    HubUnreachableError,
    ImageError,
    ModelLoadingError,
    ModelNotCachedError,
    ModelNotFoundError,
    ModelUnavailableError,
    ParameterError,
    QueueFullError,
)
from vitnp.options import EngineOptions, ServingOptions
from vitnp.registry import ModelRegistry
from vitnp.startup import NamedModel

BACKEND = "numba"
CACHED_ID = "cached-org/tiny-vit"
BROKEN_ID = "cached-org/broken-vit"
HOLD_S = 60


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers huggingface_hub's HEAD .../resolve/<rev>/config.json by the repo's organisation: "missing" (404
    RepoNotFound), "down" (503), "slow" (held until `release` is set, then 404)."""

    daemon_threads = True

    def __init__(self):
        self.lookups: Counter = Counter()
        self.release = threading.Event()
        super().__init__(("127.0.0.1", 0), FakeHubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        parts = self.path.strip("/").split("/")
        if parts[2:3] != ["resolve"]:  # not a file lookup (huggingface_hub's other calls)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        repo = "/".join(parts[:2])
        self.server.lookups[repo] += 1
        if parts[0] == "slow":
            self.server.release.wait(HOLD_S)
        if parts[0] == "down":
            self.send_response(503)
            self.send_header("Content-Length", "0")
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
            self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, tiny_vit):
    from huggingface_hub import constants

    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    cache = tmp_path / "hub-cache"
    fill_hub_cache(cache, CACHED_ID, tiny_vit)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_vit, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fill_hub_cache(cache, BROKEN_ID, broken, commit="1" * 40)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.release.set()
    hub.shutdown()


@pytest.fixture(scope="module")
def lib_vit(tiny_vit):
    return vitnp.load(tiny_vit, backend=BACKEND)


@pytest.fixture(scope="module")
def images(examples_dir) -> list[bytes]:
    return [(examples_dir / name).read_bytes() for name in ("cats.jpg", "coffee.jpg")]


def service_for(load_on_demand=False, startup=(), **serving) -> InferenceService:
    options = ServingOptions(**{"warmup": False, **serving})
    registry = ModelRegistry(options, EngineOptions(BACKEND), load_on_demand=load_on_demand)
    for model in startup:
        registry.add(registry.load(model))
    return InferenceService(registry, options)


def samples(service: InferenceService) -> dict:
    """{(metric sample name, sorted labels): value} from the service's /metrics text."""
    body, content_type = service.metrics.render()
    assert content_type.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- unknown and broken models


def test_unknown_models_fail_with_their_own_error_once_per_lookup(fake_hub, images):
    service = service_for(load_on_demand=True, hub_timeout=1.0, failure_memory=60.0)

    async def scenario():
        for name, error, fragment in [
            ("missing/model", ModelNotFoundError, "does not exist on the Hugging Face Hub"),
            ("down/model", HubUnreachableError, "did not answer"),
            ("slow/model", HubUnreachableError, "did not answer within 1 seconds"),
            ("bundled:nope", ModelNotFoundError, "does not exist"),
        ]:
            for attempt in range(3):
                with pytest.raises(error) as e:
                    await service.classify(name, images[:1])
                assert fragment in str(e.value), (name, str(e.value))
            if not name.startswith("bundled:"):
                # The second and third requests were answered from memory: the Hub saw one lookup.
                assert fake_hub.lookups[name] == 1, (name, fake_hub.lookups)

    try:
        run(scenario())
    finally:
        service.close()


def test_offline_server_answers_not_cached_without_a_lookup(fake_hub, monkeypatch, images):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    service = service_for(load_on_demand=True)
    try:
        with pytest.raises(ModelNotCachedError, match="offline"):
            run(service.classify("nobody/not-cached", images[:1]))
    finally:
        service.close()
    assert sum(fake_hub.lookups.values()) == 0


def test_broken_checkpoint_is_loaded_once(fake_hub, images):
    service = service_for(load_on_demand=True)

    async def scenario():
        for _ in range(3):
            with pytest.raises(ModelUnavailableError, match="malformed"):
                await service.classify(BROKEN_ID, images[:1])

    try:
        run(scenario())
        assert samples(service)[("vitnp_model_load_failures_total", (("model", BROKEN_ID),))] == 1
    finally:
        service.close()
    assert fake_hub.lookups[BROKEN_ID] == 0, "a cached model needs no lookup"


def test_loading_model_is_waited_for_or_answered_503(fake_hub, lib_vit, images):
    service = service_for(load_on_demand=True)

    async def scenario():
        with pytest.raises(ModelLoadingError) as e:
            await service.classify(CACHED_ID, images[:1], wait_for_model=False)
        assert e.value.estimated_time > 0 and e.value.model == CACHED_ID
        # A request that does not say (None) waits for the load, as one that asks to (True).
        default, explicit = await asyncio.gather(service.classify(CACHED_ID, images[:1]),
                                                 service.classify(CACHED_ID, images[1:], wait_for_model=True))
        return default, explicit

    try:
        default, explicit = run(scenario())
        assert default[0].predictions == lib_vit.classify(images[0])
        assert explicit[0].predictions == lib_vit.classify(images[1])
        s = samples(service)
        assert s[("vitnp_rejected_requests_total", (("model", CACHED_ID), ("reason", "loading")))] == 1
        assert s[("vitnp_model_load_duration_seconds_count", (("model", CACHED_ID),))] == 1
    finally:
        service.close()
    assert fake_hub.lookups[CACHED_ID] == 0


def test_load_timeout_answers_503_with_an_estimate(fake_hub, images):
    service = service_for(load_on_demand=True, load_timeout=0.0)
    try:
        with pytest.raises(ModelLoadingError) as e:
            run(service.classify(CACHED_ID, images[:1]))
        assert e.value.estimated_time >= 1
    finally:
        service.close()


# --------------------------------------------------------------------------- lists, queue, deadline


def test_list_inputs_are_answered_per_image_and_counted(tiny_vit, lib_vit, images):
    service = service_for(startup=[NamedModel("tiny", (), str(tiny_vit))], max_queue=4, max_batch_size=4)

    async def scenario():
        first = await service.classify(None, images + images[:1], top_k=3)
        again = await service.classify("tiny", images, top_k=3)
        with pytest.raises(ParameterError, match="more than model tiny queues at once"):
            await service.classify("tiny", images * 3)
        with pytest.raises(ImageError, match=r"inputs\[1\]"):
            await service.classify("tiny", [images[0], b"not an image"], use_cache=False)
        return first, again

    try:
        first, again = run(scenario())
        assert [c.predictions for c in first] == [lib_vit.classify(i, top_k=3) for i in images + images[:1]]
        assert [c.cache_hit for c in again] == [True, True]
        assert service.registry.lookup("tiny").waiting == 0, "the failed decode withdrew both images"
        s = samples(service)
        model = (("model", "tiny"),)
        assert s[("vitnp_images_classified_total", model)] == 3  # the failed request computed nothing
        assert s[("vitnp_cache_hits_total", model)] == 2 and s[("vitnp_cache_misses_total", model)] == 3 + 6
        assert s[("vitnp_queue_duration_seconds_count", model)] == 3
        assert s[("vitnp_queue_size", model)] == 0
    finally:
        service.close()


def test_queued_request_is_dropped_at_its_deadline(tiny_vit, lib_vit, images):
    """Batches wait 3 s to fill: a request whose deadline comes first is dropped from the queue (503), the
    queue slot is given back, and requests without a deadline are still answered."""
    service = service_for(startup=[NamedModel("tiny", (), str(tiny_vit))], max_wait_ms=3000, max_queue=2,
                          cache_size=0)
    worker = service.registry.lookup("tiny")

    async def scenario():
        patient = asyncio.ensure_future(service.classify("tiny", images[:1]))
        await asyncio.sleep(0.2)
        with pytest.raises(QueueFullError):
            await service.classify("tiny", images)
        with pytest.raises(DeadlineExceededError, match="request-timeout"):
            await service.classify("tiny", images[1:], deadline=time.monotonic() + 0.3)
        assert worker.waiting == 1
        return await patient

    try:
        patient = run(scenario())
        assert patient[0].predictions == lib_vit.classify(images[0]) and patient[0].batch_size == 1
        s = samples(service)
        assert s[("vitnp_rejected_requests_total", (("model", "tiny"), ("reason", "deadline")))] == 1
        assert s[("vitnp_rejected_requests_total", (("model", "tiny"), ("reason", "queue_full")))] == 1
        assert s[("vitnp_batch_size_count", (("model", "tiny"),))] == 1
    finally:
        service.close()


# --------------------------------------------------------------------------- readiness, info, metrics


def test_readiness_follows_startup_models_and_drain(tiny_vit, lib_vit, images):
    options = ServingOptions(warmup=False)
    registry = ModelRegistry(options, EngineOptions(BACKEND))
    service = InferenceService(registry, options)

    async def scenario():
        started = registry.start([NamedModel("tiny", ("alias-org/tiny",), str(tiny_vit))])
        ready, reason = service.readiness()
        assert not ready and reason == "loading model tiny"
        with pytest.raises(ModelLoadingError):
            await service.classify(None, images[:1], wait_for_model=False)
        answer = await service.classify("alias-org/tiny", images[:1])  # waits for the load
        await started
        return answer

    try:
        answer = run(scenario())
        assert answer[0].predictions == lib_vit.classify(images[0])
        assert service.readiness() == (True, "ready")
        info = service.info()
        assert info["model_id"] == "tiny" and info["version"] == vitnp.__version__
        assert [m["model_id"] for m in info["models"]] == ["tiny"]
        assert info["engine"]["backend"] == BACKEND and info["engine"]["isa"]
        assert info["batching"]["max_batch_size"] == options.max_batch_size
        assert info["limits"]["load_timeout"] == options.load_timeout
        service.drain()
        assert service.readiness()[0] is False
    finally:
        service.close()


def test_failed_startup_model_fails_the_start(tmp_path, images):
    options = ServingOptions(warmup=False)
    registry = ModelRegistry(options, EngineOptions(BACKEND))
    service = InferenceService(registry, options)

    async def scenario():
        started = registry.start([NamedModel("gone", (), str(tmp_path / "no-such-dir"))])
        with pytest.raises(ModelNotFoundError):
            await started
        with pytest.raises(ModelNotFoundError):
            await service.classify(None, images[:1])

    try:
        run(scenario())
    finally:
        service.close()


def test_request_metrics_by_route_template_and_status():
    from vitnp.metrics import Metrics

    metrics = Metrics()
    metrics.request_finished("m", "/models/{model_id}", 200, 0.01, 1)
    metrics.request_finished("m", "/models/{model_id}", 200, 0.02, 1)
    metrics.request_finished(None, "/", 400, 0.001, 0)
    text = metrics.render()[0].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["vitnp_requests"].samples}
    assert requests[(("model", "m"), ("route", "/models/{model_id}"), ("status", "200"))] == 2
    assert requests[(("model", ""), ("route", "/"), ("status", "400"))] == 1
    durations = {s.name: s.value for s in families["vitnp_request_duration_seconds"].samples
                 if s.labels.get("model") == "m" and s.labels.get("le") in (None, "+Inf")}
    assert durations["vitnp_request_duration_seconds_count"] == 2
    assert abs(durations["vitnp_request_duration_seconds_sum"] - 0.03) < 1e-9


# --------------------------------------------------------------------------- a real server: no stall


def test_unknown_model_lookups_never_delay_a_ready_model(tmp_path, tiny_vit, lib_vit):
    """8 requests for unknown models whose Hub lookups hang, and meanwhile a 1.5 MB JSON request for a model
    that is ready: it is answered while every lookup is still hanging. Then the lookups end (no such
    repository: 404), and a second request for one of them is answered from memory, with no new lookup."""
    import base64
    import concurrent.futures
    import io

    import numpy as np
    import requests
    from PIL import Image

    from test_server import ServerProcess

    hub = FakeHub()
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    pixels = np.random.default_rng(0).integers(0, 256, (620, 620, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    image = buf.getvalue()
    body = json.dumps({"inputs": base64.b64encode(image).decode()}).encode()
    assert len(body) > 1_500_000
    proc = ServerProcess(["--model", f"ready-org/tiny-vit={tiny_vit}", "--load-on-demand", "--max-body-mb", "4",
                          "--hub-timeout", "30"], tmp_path / "server.log",
                         env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub"),
                              "VITNP_API_TOKEN": ""})
    unknown = [f"slow/unknown-{i}" for i in range(8)]
    ready_url = f"{proc.url}/models/ready-org/tiny-vit"
    json_no_cache = {"Content-Type": "application/json", "x-use-cache": "false"}
    try:
        t0 = time.perf_counter()
        assert requests.post(ready_url, data=body, timeout=120, headers=json_no_cache).status_code == 200
        alone_seconds = time.perf_counter() - t0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(requests.post, f"{proc.url}/models/{name}", data=image, timeout=120)
                       for name in unknown]
            for _ in range(300):  # until the lookup pool is busy with hanging lookups
                if sum(hub.lookups.values()) >= 4:
                    break
                time.sleep(0.1)
            assert sum(hub.lookups.values()) >= 4, hub.lookups
            t0 = time.perf_counter()
            ready = requests.post(ready_url, data=body, timeout=120, headers=json_no_cache)
            ready_seconds = time.perf_counter() - t0
            assert not any(f.done() for f in pending), "the unknown-model lookups were still hanging"
            hub.release.set()
            answers = [f.result() for f in pending]
        assert ready.status_code == 200, ready.text
        assert ready.json() == lib_vit.classify(image)
        assert [a.status_code for a in answers] == [404] * 8
        assert all("does not exist on the Hugging Face Hub" in a.json()["error"] for a in answers)
        assert sorted(hub.lookups) == sorted(unknown) and set(hub.lookups.values()) == {1}
        t0 = time.perf_counter()
        again = requests.post(f"{proc.url}/models/{unknown[0]}", data=image, timeout=120)
        again_seconds = time.perf_counter() - t0
        assert again.status_code == 404 and hub.lookups[unknown[0]] == 1
        print(f"1.5 MB JSON request alone: {alone_seconds:.3f}s, during 8 hanging lookups: {ready_seconds:.3f}s; "
              f"unknown model answered again from memory: {again_seconds:.3f}s")
    finally:
        proc.stop()
        hub.release.set()
        hub.shutdown()
