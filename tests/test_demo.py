"""The demo's traffic: event time from the wall clock unless fixed, a shadow model on the same requests."""

from __future__ import annotations

import orjson

from streamlearn.demo.run import TORCH_MODEL, DemoOptions, demo_spec
from streamlearn.demo.traffic import TrafficGenerator, TrafficSpec


def _messages(spec: TrafficSpec) -> list:
    return list(TrafficGenerator(spec).messages())


def test_live_traffic_starts_at_the_wall_clock_and_runs_at_its_pace():
    spec = demo_spec(DemoOptions(requests=400, rate=200.0), now=1_900_000_000.0)
    logs = [m for m in _messages(spec) if m.topic == "inference-logs" and m.malformed is None]
    assert logs[0].ts == 1_900_000_000.0
    assert abs(max(m.ts for m in logs) - logs[0].ts - 399 / 200.0) < 1e-6   # 200 requests per wall second


def test_fixed_start_gives_the_same_bytes_whenever_it_runs():
    options = DemoOptions(requests=300, start_ts=1_800_000_000.0)
    first = _messages(demo_spec(options, now=1_900_000_000.0))
    later = _messages(demo_spec(options, now=1_900_086_400.0))
    assert [m.value for m in first] == [m.value for m in later]
    assert first[0].ts == 1_800_000_000.0


def test_as_fast_as_possible_is_a_backlog_that_ended_before_the_start():
    now = 1_900_000_000.0
    messages = _messages(demo_spec(DemoOptions(requests=500, rate=0.0), now=now))
    assert all(m.ts <= now for m in messages)   # never from the future: no negative latency
    assert messages[0].ts < now - 500 / 2_000.0


def test_shadow_model_gets_the_same_requests_and_leaves_the_base_traffic_alone():
    base = TrafficSpec(requests=500, seed=5)
    plain = _messages(base)
    shadowed = _messages(TrafficSpec(requests=500, seed=5, shadow=TORCH_MODEL))
    assert [m.value for m in shadowed if b"/" + TORCH_MODEL.encode() not in (m.key or b"")] == [m.value for m in plain]
    copies = [orjson.loads(m.value) for m in shadowed if m.key and m.key.endswith(b"/" + TORCH_MODEL.encode())]
    originals = [orjson.loads(m.value) for m in plain if m.malformed is None]
    assert len(copies) == len(originals)
    for copy, original in zip(copies, originals):
        assert copy["request_id"] == f"{original['request_id']}/{TORCH_MODEL}"
        assert copy.get("model", TORCH_MODEL) == TORCH_MODEL and copy["ts"] == original["ts"]
        assert copy.get("features") == original.get("features") and copy.get("label") == original.get("label")
