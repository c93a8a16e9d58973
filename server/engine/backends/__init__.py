"""One module per engine, each a `Backend` (base.py): `run(Batch, outputs) -> arrays`,
synchronous and thread-safe. onnxruntime.py (CPU and CUDA), openvino.py (CPU, f32 or bf16),
fake.py (a GPU's timing without a GPU, for benchmarks). A new engine is a new module here and
a branch in engine/loader.py's `_build`.

May import: engine.batch, engine.costmodel, the root modules.
"""
