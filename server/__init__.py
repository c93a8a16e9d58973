"""bertstream's server: repository, lifecycle, batcher, runtime and the gRPC servicers."""

__all__: list[str] = []


def server_version() -> str:
    """The installed bertstream's version, as metadata endpoints report it."""
    from importlib import metadata

    try:
        return metadata.version("bertstream")
    except metadata.PackageNotFoundError:
        return "unknown"
