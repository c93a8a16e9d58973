"""The protocol edges: bertstream.v1's servicer and its ordered streams, KServe v2 over gRPC,
health, the interceptors (request decoding, auth and TLS, the stage clock's edge, the shutdown
gate) and, in http/, the HTTP dialects. Each edge is thin: it decodes, calls the pipeline or the
models interface, and encodes; errors become statuses through errors.to_status.

May import: pipeline, repository (the models interface, snapshots, version states), the root
modules. Never the engine: what a caller may see of it comes through the repository's records.
"""
