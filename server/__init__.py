"""bertstream's server: repository, lifecycle, batcher, runtime and the gRPC servicers."""

__all__: list[str] = []
