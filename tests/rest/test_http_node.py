"""Node.js's own `fetch` (Node 18+, no modules) against `/v1/embeddings`: JSON from another
language's HTTP stack must give the vectors gRPC gives. Skipped only where `node` is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from rest.conftest import HttpServer, cosine, grpc_embed

TEXTS = ["今天股市大涨，沪指收复三千点", "颱風來襲，學校停課一天", "emoji 😀 and ascii"]

# Prints {status, body} for each encoding; base64 is decoded here as little-endian float32.
SCRIPT = r"""
const [url, given] = process.argv.slice(-2);  // with -e there is no script path
const texts = JSON.parse(given);
const out = {};
for (const format of ["float", "base64"]) {
  const reply = await fetch(url + "/v1/embeddings", {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({model: "tiny-embed", input: texts, encoding_format: format}),
  });
  const body = await reply.json();
  if (format === "base64" && reply.ok) {
    for (const item of body.data) {
      const bytes = Buffer.from(item.embedding, "base64");
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      item.embedding = Array.from({length: bytes.length / 4},
                                  (_, i) => view.getFloat32(4 * i, true));
    }
  }
  out[format] = {status: reply.status, body};
}
const missing = await fetch(url + "/v1/embeddings", {method: "POST", body: "{\"input\": 1}"});
out.error = {status: missing.status, body: await missing.json()};
console.log(JSON.stringify(out));
"""


def test_node_fetch_gets_the_grpc_vectors(http_server: HttpServer) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js fetch test skipped: `node` not on PATH (install Node.js >= 18)")
    done = subprocess.run([node, "--input-type=module", "-e", SCRIPT, http_server.url,
                           json.dumps(TEXTS)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    reference = grpc_embed(http_server.address, TEXTS)
    for format in ("float", "base64"):
        assert out[format]["status"] == 200, out[format]
        body = out[format]["body"]
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        vectors = np.array([d["embedding"] for d in body["data"]], np.float32)
        assert vectors.shape == (3, 64)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert cosine(vectors, reference).min() >= 0.9999
        assert body["usage"]["total_tokens"] > 0
    # float32 both ways: JSON floats and base64 bytes decode to the same numbers
    floats = np.array([d["embedding"] for d in out["float"]["body"]["data"]], np.float32)
    decoded = np.array([d["embedding"] for d in out["base64"]["body"]["data"]], np.float32)
    np.testing.assert_array_equal(floats, decoded)
    assert out["error"]["status"] == 400
    assert out["error"]["body"]["error"]["type"] == "invalid_request_error"
