"""vitnp on Ray: Ray Data jobs, `vitnp classify --ray`, `vitnp serve --ray` (and its metrics in Ray's own
Prometheus export), and a worker killed mid-job.

One local Ray cluster (2 CPUs, no dashboard) serves the whole module. Every answer is compared with the
library, `vitnp.load("bundled:digits", backend="numba").classify`, whose results do not depend on batch size
or thread count, so equality is exact. Ray Serve listens on 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

import vitnp

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
import vitnp.ray  # noqa: E402

MODEL = "bundled:digits"
BACKEND = "numba"
CORRUPT = "digit-corrupt.png"
TEXT = "notes-not-an-image.png"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def shared(ray_cluster):
    return vitnp.ray.share(MODEL, backend=BACKEND)


@pytest.fixture(scope="module")
def lib():
    return vitnp.load(MODEL, backend=BACKEND)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, examples_dir):
    """The ten digit PNGs, one truncated PNG and one text file named .png."""
    root = tmp_path_factory.mktemp("digits")
    for f in sorted((examples_dir / "digits").glob("*.png")):
        shutil.copy(f, root / f.name)
    good = (examples_dir / "digits" / "digit-3-idx0705.png").read_bytes()
    (root / CORRUPT).write_bytes(good[: len(good) // 2])
    (root / TEXT).write_text("hello, not an image")
    return root


def expected_rows(lib, image_dir, top_k):
    """path -> (predictions, None) or (None, error text) from the library, per file."""
    out = {}
    for path in sorted(str(p) for p in image_dir.iterdir()):
        try:
            out[path] = (lib.classify(path, top_k=top_k), None)
        except vitnp.ImageError as e:
            out[path] = (None, str(e))
    return out


def check_rows(rows, expected):
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(expected), "every file exactly once"
    for r in rows:
        predictions, error = expected[r["path"]]
        if error is None:
            assert r["error"] is None, r["error"]
            assert list(r["predictions"]) == predictions
            assert (r["label"], r["score"]) == (predictions[0]["label"], predictions[0]["score"])
        else:
            assert r["predictions"] is None and r["label"] is None and r["score"] is None
            assert r["error"] == error, "the same message as the library / local CLI"


def as_python(rows):
    """take_all() rows may hold numpy values; make them plain lists of dicts."""
    out = []
    for r in rows:
        r = dict(r)
        if r["predictions"] is not None:
            r["predictions"] = [{"label": p["label"], "score": p["score"]} for p in r["predictions"]]
        out.append(r)
    return out


# --------------------------------------------------------------------------- Ray Data


def test_binary_files_job_matches_library_row_for_row(shared, lib, image_dir):
    # The two actors hold both CPUs: the reads (I/O only) must not wait for a CPU.
    ds = ray.data.read_binary_files(str(image_dir), include_paths=True, num_cpus=0)
    ds = ds.map_batches(vitnp.ray.ImageClassifier, fn_constructor_kwargs={"model": shared, "top_k": 3},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=4, num_cpus=1)
    rows = as_python(ds.take_all())
    expected = expected_rows(lib, image_dir, 3)
    assert len(rows) == 12
    check_rows(rows, expected)
    assert "truncated" in expected[str(image_dir / CORRUPT)][1]
    assert "bytes" not in rows[0], "the raw image column is not copied to the output"


def test_path_column_job_reads_files_in_the_actors(shared, lib, image_dir):
    """The CLI job's input: path blocks built on the driver, files read (or found missing) by the actors."""
    missing = str(image_dir.parent / "no-such-digit.png")
    paths = sorted(str(p) for p in image_dir.iterdir()) + [missing]
    ds = ray.data.from_arrow(vitnp.ray.path_blocks(paths, 4))
    ds = ds.map_batches(vitnp.ray.ImageClassifier, fn_constructor_kwargs={"model": shared, "top_k": 3},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=4, num_cpus=1)
    rows = as_python(ds.take_all())
    expected = expected_rows(lib, image_dir, 3)
    with pytest.raises(vitnp.ImageError) as e:
        lib.classify(missing)
    expected[missing] = (None, str(e.value))
    assert len(rows) == 13
    check_rows(rows, expected)
    assert "no such file" in expected[missing][1]


@pytest.mark.parametrize("count, batch_size", [(1, 8), (96, 8), (97, 8), (13, 4), (9000, 8), (2_000_000, 16)])
def test_path_blocks_hold_whole_batches_in_order(count, batch_size):
    paths = [f"/images/{i:07d}.jpg" for i in range(count)]
    blocks = vitnp.ray.path_blocks(paths, batch_size)
    sizes = [b.num_rows for b in blocks]
    assert [p for b in blocks for p in b.column("path").to_pylist()] == paths
    assert all(n % batch_size == 0 for n in sizes[:-1]), "only the job's last batch may be short"
    assert max(sizes) <= batch_size * vitnp.ray.MAX_BATCHES_PER_BLOCK
    expected_blocks = -(-count // batch_size) if count <= batch_size * vitnp.ray.TARGET_BLOCKS else None
    if expected_blocks:
        assert len(blocks) == expected_blocks, "one batch per block on jobs up to TARGET_BLOCKS batches"
    else:
        assert len(blocks) <= 2 * vitnp.ray.TARGET_BLOCKS or max(sizes) == batch_size * vitnp.ray.MAX_BATCHES_PER_BLOCK


def test_run_job_without_paths_writes_empty_files(shared, tmp_path):
    import pyarrow.parquet as pq

    assert vitnp.ray.run_job([], shared, tmp_path / "none.parquet") == (0, 0)
    table = pq.read_table(tmp_path / "none.parquet")
    assert table.num_rows == 0 and table.column_names == ["path", *vitnp.ray.OUTPUT_COLUMNS]
    assert vitnp.ray.run_job([], shared, tmp_path / "none.jsonl") == (0, 0)
    assert (tmp_path / "none.jsonl").read_text() == ""


def test_read_images_arrays_match_library(shared, lib, image_dir, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    for f in image_dir.glob("digit-[0-9]-*.png"):
        shutil.copy(f, good / f.name)
    ds = ray.data.read_images(str(good), include_paths=True)
    ds = ds.map_batches(vitnp.ray.ImageClassifier, fn_constructor_kwargs={"model": shared, "top_k": 2},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=3, num_cpus=1)
    rows = as_python(ds.take_all())
    assert len(rows) == 10
    for r in rows:
        name = Path(r["path"]).name
        assert r["error"] is None and r["predictions"] == lib.classify(good / name, top_k=2)


def test_bad_arrays_become_error_rows_and_model_by_name(ray_cluster, lib, image_dir):
    """A model given by name (each actor loads it), a bad array among good ones, the pandas batch format."""
    from PIL import Image

    digit = np.asarray(Image.open(image_dir / "digit-7-idx1496.png").convert("RGB"))
    items = [{"id": 0, "image": digit}, {"id": 1, "image": np.zeros((5, 5, 2), np.uint8)},
             {"id": 2, "image": digit[::-1].copy()}]
    ds = ray.data.from_items(items).map_batches(
        vitnp.ray.ImageClassifier, fn_constructor_kwargs={"model": MODEL, "top_k": 4},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=8, batch_format="pandas", num_cpus=1)
    rows = sorted(as_python(ds.take_all()), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[0]["predictions"] == lib.classify(digit, top_k=4)
    assert rows[2]["predictions"] == lib.classify(digit[::-1].copy(), top_k=4)
    assert rows[1]["predictions"] is None and rows[1]["error"]
    with pytest.raises(vitnp.ImageError) as e:
        lib.classify(np.zeros((5, 5, 2), np.uint8))
    assert rows[1]["error"] == str(e.value)


class KillableClassifier(vitnp.ray.ImageClassifier):
    """The first actor to get a batch writes its PID and waits there to be killed."""

    def __init__(self, marker: str, **kwargs):
        super().__init__(**kwargs)
        self.marker = marker

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            tmp = self.marker + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.replace(tmp, self.marker)
            time.sleep(JOB_TIMEOUT_S)
        return super().__call__(batch)


def test_actor_killed_mid_job_every_row_exactly_once(shared, lib, image_dir, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    marker = tmp_path / "victim.pid"
    ds = ray.data.read_binary_files(str(image_dir), include_paths=True)
    ds = ds.map_batches(KillableClassifier, fn_constructor_kwargs={"marker": str(marker), "model": shared,
                                                                    "top_k": 5},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=2, num_cpus=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(ds.take_all)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not marker.exists():
            assert time.monotonic() < deadline and not job.done(), "no actor reached its first batch"
            time.sleep(0.1)
        victim = int(marker.read_text())
        os.kill(victim, signal.SIGKILL)
        rows = as_python(job.result(timeout=JOB_TIMEOUT_S))
    assert not os.path.exists(f"/proc/{victim}") or "zombie" in Path(f"/proc/{victim}/status").read_text()
    assert len(rows) == 12
    check_rows(rows, expected_rows(lib, image_dir, 5))


def test_actors_map_one_shared_read_only_copy_of_the_weights(shared, lib, image_dir):
    """Two actors' weight arrays lie in the same shared-memory object-store file, read-only; the engine
    computes with them (same results as the library)."""

    @ray.remote(num_cpus=0.5)
    class Probe:
        def __init__(self, model):
            self.udf = vitnp.ray.ImageClassifier(model, threads=1)

        def where(self):
            array = self.udf.classifier.weights.layers[0].fc1.weight_array
            address = array.__array_interface__["data"][0]
            for line in open("/proc/self/maps"):
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    return {"writeable": bool(array.flags.writeable), "file": " ".join(fields[5:]),
                            "inode": fields[4], "pid": os.getpid()}
            return None

        def classify(self, data: bytes):
            return self.udf({"bytes": np.array([data], dtype=object)}).column("predictions").to_pylist()[0]

    probes = [Probe.remote(shared) for _ in range(2)]
    try:
        found = ray.get([p.where.remote() for p in probes], timeout=JOB_TIMEOUT_S)
        path = image_dir / "digit-5-idx1319.png"
        results = ray.get([p.classify.remote(path.read_bytes()) for p in probes], timeout=JOB_TIMEOUT_S)
    finally:
        for p in probes:
            ray.kill(p)
    assert found[0]["pid"] != found[1]["pid"]
    for f in found:
        assert f is not None and not f["writeable"] and "plasma" in f["file"], f
    assert (found[0]["file"], found[0]["inode"]) == (found[1]["file"], found[1]["inode"])
    assert results == [lib.classify(path), lib.classify(path)]


# --------------------------------------------------------------------------- vitnp classify --ray


def run_cli(*args, timeout=JOB_TIMEOUT_S):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "vitnp", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_cli_ray_writes_complete_parquet(lib, image_dir, tmp_path):
    """Its own local Ray cluster, two workers, a glob and a directory."""
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    result = run_cli("classify", image_dir / "digit-[0-4]-*.png", image_dir, "--model", MODEL, "--ray",
                     "--workers", "2", "--batch-size", "3", "--top-k", "3", "--output", out)
    assert result.returncode == 1, result.stderr  # two bad files
    assert "2 of 17 images failed" in result.stderr and "Traceback" not in result.stderr
    rows = pq.read_table(out).to_pylist()
    local = run_cli("classify", image_dir / "digit-[0-4]-*.png", image_dir, "--model", MODEL, "--json",
                    "--backend", BACKEND, "--top-k", "3")
    local_records = [json.loads(line) for line in local.stdout.splitlines()]
    # Rows come in input order (the local CLI prints a batch's errors before its results).
    from vitnp.files import find_images

    assert [r["path"] for r in rows] == find_images([str(image_dir / "digit-[0-4]-*.png"), str(image_dir)])
    local_records.sort(key=lambda r: r["path"])
    for row, record in zip(sorted(rows, key=lambda r: r["path"]), local_records):
        assert row["path"] == record["path"]
        assert row["predictions"] == record.get("predictions") and row["error"] == record.get("error")
        if row["error"] is None:
            assert (row["label"], row["score"]) == (record["predictions"][0]["label"],
                                                    record["predictions"][0]["score"])
    assert not list(tmp_path.glob(".*partial"))


def test_cli_ray_existing_cluster_writes_jsonl_like_local_json(ray_cluster, image_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    result = run_cli("classify", image_dir, "--model", MODEL, "--ray", "--ray-address", ray_cluster,
                     "--output", out)
    assert result.returncode == 1, result.stderr
    local = run_cli("classify", image_dir, "--model", MODEL, "--json", "--backend", BACKEND)
    assert sorted(out.read_text().splitlines()) == sorted(local.stdout.splitlines())
    assert len(local.stdout.splitlines()) == 12


def test_cli_ray_needs_an_output_file(image_dir):
    result = run_cli("classify", image_dir, "--model", MODEL, "--ray", timeout=120)
    assert result.returncode == 2 and "--output" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("classify", image_dir, "--model", MODEL, "--ray", "--output", "out.csv", timeout=120)
    assert result.returncode == 2 and ".parquet or .jsonl" in result.stderr


# --------------------------------------------------------------------------- vitnp serve --ray


@pytest.fixture(scope="module")
def servers(ray_cluster, tmp_path_factory):
    """`vitnp serve --ray` on the test cluster and plain `vitnp serve`, with the same options."""
    from test_server import ServerProcess

    class RayServerProcess(ServerProcess):
        # Serve's proxy accepts connections before a replica is ready and holds /health until one is:
        # a read timeout means "not yet", like a refused connection.
        NOT_UP_YET = (requests.RequestException,)
        POLL_S = 0.5

    logs = tmp_path_factory.mktemp("ray-serve-logs")
    common = ["--model", MODEL, "--max-body-mb", "0.25", "--max-batch-size", "4", "--max-wait-ms", "20"]
    env = {"RAY_USAGE_STATS_ENABLED": "0", "VITNP_API_TOKEN": ""}
    plain = ServerProcess(common, logs / "plain.log", env=env)
    try:
        on_ray = RayServerProcess([*common, "--ray", "--ray-address", ray_cluster, "--replicas", "2"],
                               logs / "ray.log", env=env)
    except BaseException:
        plain.stop()
        raise
    yield plain, on_ray
    on_ray.stop()
    plain.stop()


def test_serve_inference_client_and_raw_bytes_match_library(servers, lib, image_dir):
    from huggingface_hub import InferenceClient

    _, on_ray = servers
    client = InferenceClient(on_ray.url)
    for path in sorted(image_dir.glob("digit-[0-9]-*.png")):
        got = client.image_classification(str(path), top_k=3)
        assert [(p.label, p.score) for p in got] == [(p["label"], p["score"]) for p in lib.classify(path, top_k=3)]
        r = requests.post(on_ray.url + f"/models/{MODEL}", data=path.read_bytes(), timeout=120)
        assert r.status_code == 200 and r.json() == lib.classify(path)
        assert r.headers["x-compute-type"] == "cpu" and "x-cache" in r.headers


def test_serve_concurrent_requests_are_batched_and_correct(servers, lib, image_dir):
    _, on_ray = servers
    paths = sorted(image_dir.glob("digit-[0-9]-*.png")) * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: requests.post(on_ray.url + "/", data=p.read_bytes(), timeout=120,
                                                        headers={"x-use-cache": "false"}), paths))
    for p, r in zip(paths, replies):
        assert r.status_code == 200 and r.json() == lib.classify(p)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_serve_errors_are_those_of_vitnp_serve(servers, image_dir):
    plain, on_ray = servers
    good = (image_dir / "digit-1-idx0442.png").read_bytes()
    cases = [
        ("/", {"data": (image_dir / CORRUPT).read_bytes()}),
        ("/", {"data": (image_dir / TEXT).read_bytes()}),
        ("/", {"data": b""}),
        ("/", {"data": b'{"inputs": ', "headers": {"content-type": "application/json"}}),
        ("/", {"json": {"inputs": "not base64 !!!"}}),
        ("/", {"json": {"inputs": b64(good), "parameters": {"top_k": 0}}}),
        ("/", {"json": {"inputs": b64(good), "parameters": {"function_to_apply": "tanh"}}}),
        ("/", {"json": {"inputs": b64(good), "parameters": [1]}}),
        ("/", {"data": good, "headers": {"x-use-cache": "perhaps"}}),
        ("/", {"data": b"x" * 300_000}),
        ("/models/nobody/no-such-model", {"data": good}),
        ("/models/bundled:nope", {"data": good}),
        ("/no/such/route", {"data": good}),
    ]
    for path, kwargs in cases:
        a = requests.post(plain.url + path, timeout=120, **kwargs)
        b = requests.post(on_ray.url + path, timeout=120, **kwargs)
        assert 400 <= a.status_code < 500, (path, a.text)
        assert (b.status_code, b.json()) == (a.status_code, a.json()), (path, kwargs.keys())
        assert b.headers["content-type"].startswith("application/json") and "Traceback" not in b.text
    assert requests.get(on_ray.url + "/health", timeout=30).json() == {"status": "ok"}
    models = requests.get(on_ray.url + "/models", timeout=30).json()
    assert [m["model_id"] for m in models] == [MODEL]


def test_serve_lists_probes_info_metrics_under_ray(servers, lib, image_dir):
    """Issue 17's features through Ray Serve: list inputs and query-string top_k answer as plain `vitnp serve`
    and the library, request ids come back, the readiness probe is the replica's, /info is what
    InferenceClient.get_endpoint_info reads, and a replica's /metrics counts what it computed."""
    from huggingface_hub import InferenceClient
    from prometheus_client.parser import text_string_to_metric_families

    plain, on_ray = servers
    paths = sorted(image_dir.glob("digit-[0-9]-*.png"))[:3]
    body = {"inputs": [b64(p.read_bytes()) for p in paths]}
    expected = [lib.classify(p, top_k=2) for p in paths]
    for server in (plain, on_ray):
        r = requests.post(server.url + "/?top_k=2", json=body, timeout=120,
                          headers={"x-use-cache": "false", "x-request-id": "ray-parity-1"})
        assert r.status_code == 200 and r.json() == expected, r.text
        assert r.headers["x-request-id"] == "ray-parity-1"
    generated = requests.post(on_ray.url + "/", data=paths[0].read_bytes(), timeout=120).headers["x-request-id"]
    assert generated and "," not in generated
    assert requests.get(on_ray.url + "/health/live", timeout=30).status_code == 200
    ready = requests.get(on_ray.url + "/health/ready", timeout=30)
    assert ready.status_code == 200, ready.text
    info = InferenceClient(model=on_ray.url, provider="hf-inference").get_endpoint_info()
    assert info["model_id"] == MODEL and [m["model_id"] for m in info["models"]] == [MODEL]
    assert info["engine"]["backend"] == BACKEND and info["batching"]["max_batch_size"] == 4
    classified = []
    for _ in range(6):  # the proxy picks a replica per scrape: each one has computed some of the images
        r = requests.get(on_ray.url + "/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        classified.append(sum(s.value for s in families["vitnp_images_classified"].samples
                              if s.labels.get("model") == MODEL and s.name.endswith("_total")))
        assert any(s.labels.get("route") == "/" and s.labels.get("status") == "200"
                   for s in families["vitnp_requests"].samples) or classified[-1] == 0
    assert max(classified) > 0, classified


EXPORT_TIMEOUT_S = 90  # Ray's metrics agent takes each worker's figures every few seconds


def ray_prometheus_export() -> dict:
    """Ray's own Prometheus export, scraped where Prometheus scrapes it: the node's metrics agent, at the
    node's metrics export port (family name -> family)."""
    from prometheus_client.parser import text_string_to_metric_families

    node = ray.nodes()[0]
    r = requests.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def exported(families: dict, sample: str, **labels) -> dict:
    """Ray worker id -> value of the samples named `sample` that carry these labels (summed per worker)."""
    values = {}
    for s in (s for family in families.values() for s in family.samples if s.name == sample):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            values[s.labels["WorkerId"]] = values.get(s.labels["WorkerId"], 0.0) + s.value
    return values


def test_serve_metrics_reach_rays_prometheus_export(servers, image_dir):
    """Every replica records through ray.util.metrics (vitnp.metrics.RayMetrics), so Ray's Prometheus export
    carries the deployment's figures, prefixed ray_, one series per replica (Ray's WorkerId label): the images
    this test sends are counted there, and each replica's series is what that replica's own /metrics says."""
    from prometheus_client.parser import text_string_to_metric_families

    from vitnp.metrics import DURATION_BUCKETS

    _, on_ray = servers
    paths = sorted(image_dir.glob("digit-[0-9]-*.png"))
    images, requests_ok, passes = ("ray_vitnp_images_classified_total", "ray_vitnp_requests_total",
                                   "ray_vitnp_inference_duration_seconds_count")
    route_ok = {"model": MODEL, "route": "/", "status": "200"}
    scrape = ray_prometheus_export()  # may lag behind the replicas, never runs ahead of them
    before = (sum(exported(scrape, images, model=MODEL).values()),
              sum(exported(scrape, requests_ok, **route_ok).values()),
              sum(exported(scrape, passes, model=MODEL).values()))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: requests.post(on_ray.url + "/", data=p.read_bytes(), timeout=120,
                                                        headers={"x-use-cache": "false"}), paths))
    assert [r.status_code for r in replies] == [200] * len(paths)

    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        families = ray_prometheus_export()
        per_replica = exported(families, images, model=MODEL)
        now = (sum(per_replica.values()), sum(exported(families, requests_ok, **route_ok).values()),
               sum(exported(families, passes, model=MODEL).values()))
        local = set()
        for _ in range(4):  # the proxy picks a replica per scrape
            text = requests.get(on_ray.url + "/metrics", timeout=30).text
            replica = {f.name: f for f in text_string_to_metric_families(text)}
            local.add(sum(s.value for s in replica["vitnp_images_classified"].samples
                          if s.name == "vitnp_images_classified_total" and s.labels.get("model") == MODEL))
            # each replica timed its own model setup (mapping the shared weights, warm-up) once
            assert [s.value for s in replica["vitnp_model_load_duration_seconds"].samples
                    if s.name.endswith("_count") and s.labels.get("model") == MODEL] == [1.0]
        if (now[0] >= before[0] + len(paths) and now[1] >= before[1] + len(paths) and now[2] > before[2]
                and local - {0.0} <= set(per_replica.values())):  # a replica with none has no series
            break
        assert time.monotonic() < deadline, (
            f"Ray's export did not catch up within {EXPORT_TIMEOUT_S}s: images, requests, forward passes "
            f"{before} -> {now}; replicas' own counts {local}, exported per replica {per_replica}")
        time.sleep(1)

    kinds = {"ray_vitnp_requests": "counter", "ray_vitnp_request_duration_seconds": "histogram",
             "ray_vitnp_queue_duration_seconds": "histogram", "ray_vitnp_inference_duration_seconds": "histogram",
             "ray_vitnp_queue_size": "gauge", "ray_vitnp_batch_size": "histogram",
             "ray_vitnp_images_classified": "counter",  # all that this test's requests record
             "ray_vitnp_model_load_duration_seconds": "histogram"}  # and each replica's startup
    assert {name: families[name].type for name in kinds} == kinds
    inference = [s for s in families["ray_vitnp_inference_duration_seconds"].samples
                 if s.name.endswith("_bucket") and s.labels["model"] == MODEL]
    assert {float(s.labels["le"]) for s in inference} == {*DURATION_BUCKETS, float("inf")}
    for worker, count in exported(families, passes, model=MODEL).items():
        assert exported(families, "ray_vitnp_inference_duration_seconds_bucket", model=MODEL,
                        le="+Inf")[worker] == count


def test_missing_ray_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(vitnp.ray.RayNotInstalledError, match=r"vitnp\[ray\]"):
        vitnp.ray.require_ray()
