"""model.trace() writes a Chrome/Perfetto timeline with the CPU, PCIe and GPU lanes."""

from __future__ import annotations

import json

from tiny_models import load_every_lane

from hf_hybrid.trace import LANES


def test_trace_has_every_lane(tiny_checkpoints, tmp_path):
    model = load_every_lane(tiny_checkpoints["mixtral"])
    path = model.trace(tmp_path / "trace.json", max_new_tokens=4)
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    lanes = {e["tid"] for e in spans}
    assert {LANES["CPU lane"], LANES["PCIe copy"], LANES["GPU"], LANES["host"]} <= lanes
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    forwards = [e for e in spans if e["name"].startswith("forward")]
    assert len(forwards) == 4  # one prefill, three decode steps
    assert model.hybrid.executor.lanes.tracer is None  # tracing stops with the call
