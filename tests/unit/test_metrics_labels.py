"""Model labels come from callers until a model resolves: their number is bounded."""

from __future__ import annotations

import grpc
import pytest
from bertstream.server.errors import ModelNotFound
from bertstream.server.metrics import MAX_MODEL_LABELS, Metrics


def test_random_model_names_cannot_grow_the_label_set_without_end() -> None:
    metrics = Metrics()
    for i in range(MAX_MODEL_LABELS + 50):
        with pytest.raises(ModelNotFound), metrics.request("Embed", f"nope-{i}"):
            raise ModelNotFound(f"no model nope-{i}")
    names = {sample.labels["model"] for family in metrics.registry.collect()
             if family.name == "bertstream_requests" for sample in family.samples}
    assert len(names) == MAX_MODEL_LABELS + 1 and "other" in names
    with metrics.request("Embed", "nope-0") as record:  # a known label keeps its name
        record.texts = 1
    codes = {sample.labels["code"] for family in metrics.registry.collect()
             if family.name == "bertstream_requests" for sample in family.samples}
    assert codes == {grpc.StatusCode.NOT_FOUND.name, grpc.StatusCode.OK.name}
