"""Generated protobuf and gRPC stubs of bertstream's API (regenerate with `make protos`)."""
