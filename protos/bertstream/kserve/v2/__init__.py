"""Generated stubs of the KServe v2 / Triton gRPC protocol (regenerate with `make protos`).

Their messages are named `inference.*`, as tritonclient's are: import them only in the server
(server/api/kserve.py), never in a process that also imports tritonclient.grpc, or protobuf's
default descriptor pool reports duplicate symbols.
"""
