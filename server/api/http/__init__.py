"""HTTP/JSON on `--http-port` (Triton's 8000): the dialects users come from, each a thin
adapter over the same pipeline, limits, tokens and TLS files as gRPC.

- common.py: the shared core: the body read under its size limit, JSON, tokens, the error
  taxonomy -> HTTP status, metrics, the drain;
- openai.py (`/v1/embeddings`, `/v1/models`), tei.py (`/embed`, `/predict`, `/tokenize`),
  bert_as_service.py (`/encode`, `/status/server`), kserve.py (KServe v2 REST, Triton's HTTP
  protocol, with the binary tensor extension);
- server.py: the Starlette app and uvicorn in the server's own event loop, sharing the port
  across front-end processes with SO_REUSEPORT as gRPC does.
"""
