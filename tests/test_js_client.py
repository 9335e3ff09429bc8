"""The real `@huggingface/inference` JavaScript client (npm, run by node) against a real `vitnp serve`.

That client retries a 503 at once, as often as it gets one, and cannot send x-wait-for-model; for binary
inputs it drops `parameters` (the body is the image). A server that waits for a loading model by default
answers it in at most 3 requests; top_k reaches the server in the query string of the endpoint URL.

The package is installed once with npm into VITNP_TEST_NPM_DIR (default ~/.cache/vitnp-tests/npm). The
script counts every request the client sends (its `fetch` option); the server's access log is counted too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import vitnp
from test_server import ServerProcess

PACKAGE = "@huggingface/inference@4"
MODEL = "bundled:digits"
DIGIT = "digit-3-idx0705.png"
NODE_TIMEOUT_S = 300

SCRIPT = r"""
import { readFileSync } from "node:fs";
import { InferenceClient } from "@huggingface/inference";

const [endpointUrl, imagePath] = process.argv.slice(2);
const statuses = [];
const counting = async (url, init) => {
  const response = await fetch(url, init);
  statuses.push(response.status);
  return response;
};
const client = new InferenceClient();
const output = await client.imageClassification(
  { endpointUrl, data: new Blob([readFileSync(imagePath)]), parameters: { top_k: 2 } },
  { fetch: counting },
);
console.log(JSON.stringify({ statuses, output }));
"""


@pytest.fixture(scope="module")
def npm_dir() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the JavaScript client test")
    root = Path(os.environ.get("VITNP_TEST_NPM_DIR", Path.home() / ".cache" / "vitnp-tests" / "npm"))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "node_modules" / "@huggingface" / "inference" / "package.json").is_file():
        (root / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", PACKAGE], cwd=root, check=True,
                       capture_output=True, timeout=NODE_TIMEOUT_S)
    (root / "classify.mjs").write_text(SCRIPT)
    return root


def classify_with_js(npm_dir: Path, endpoint_url: str, image: Path) -> dict:
    done = subprocess.run(["node", str(npm_dir / "classify.mjs"), endpoint_url, str(image)], cwd=npm_dir,
                          capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def access_lines(server: ServerProcess, path: str) -> int:
    return sum(1 for line in server.log().splitlines() if "vitnp.access" in line and path in line)


@pytest.fixture
def on_demand_server(tmp_path):
    proc = ServerProcess(["--load-on-demand"], tmp_path / "server.log",
                         env={"HF_HUB_OFFLINE": "1", "VITNP_API_TOKEN": ""})
    yield proc
    proc.stop()


def test_js_client_gets_a_loading_model_in_at_most_3_requests(npm_dir, on_demand_server, examples_dir):
    image = examples_dir / "digits" / DIGIT
    lib = vitnp.load(MODEL, backend="numba")
    path = f"/models/{MODEL}"
    result = classify_with_js(npm_dir, on_demand_server.url + path, image)
    print(f"@huggingface/inference imageClassification on a model loading on demand: {len(result['statuses'])} "
          f"request(s), statuses {result['statuses']}")
    assert result["statuses"][-1] == 200 and len(result["statuses"]) <= 3, result["statuses"]
    assert access_lines(on_demand_server, path) == len(result["statuses"])
    # parameters: {top_k: 2} were dropped with the binary body: the server's default top_k (5) answered.
    assert result["output"] == lib.classify(image)
    # What such users can do instead: top_k in the query string of the endpoint URL.
    result = classify_with_js(npm_dir, on_demand_server.url + path + "?top_k=2", image)
    assert result["statuses"] == [200] and result["output"] == lib.classify(image, top_k=2)


def test_js_client_waits_for_a_startup_model_loading_with_the_port_open(npm_dir, tmp_path, examples_dir):
    image = examples_dir / "digits" / DIGIT
    lib = vitnp.load(MODEL, backend="numba")
    proc = ServerProcess(["--model", MODEL], tmp_path / "server.log",
                         env={"HF_HUB_OFFLINE": "1", "VITNP_API_TOKEN": ""})
    try:
        result = classify_with_js(npm_dir, proc.url + "/", image)
    finally:
        proc.stop()
    assert result["statuses"][-1] == 200 and len(result["statuses"]) <= 3, result["statuses"]
    assert result["output"] == lib.classify(image)
