"""bertstream's server, in layers; every import points down (import-linter checks it: the
contracts are in pyproject.toml, `make lint-imports` runs them):

    app, options          the composition root: flags -> ServerOptions -> the parts, wired
    processes | api       processes: supervisor, engine and front-end processes, their link;
                          api: the protocol edges (bertstream.v1, KServe gRPC, HTTP dialects)
    pipeline              a request's path: validate -> tokenize -> pick outputs -> submit
    repository            the control plane: disk, config.pbtxt, version states, the manager
    engine                tokenizer, batcher, scheduler, cost model, loader, backends/
    errors, metrics, stages, tracing, version_format, ports
                          shared vocabulary; import no package

docs/architecture.md has the picture and "where to add" a dialect, a backend, an RPC.
"""

__all__: list[str] = []


def server_version() -> str:
    """The installed bertstream's version, as metadata endpoints report it."""
    from importlib import metadata

    try:
        return metadata.version("bertstream")
    except metadata.PackageNotFoundError:
        return "unknown"
