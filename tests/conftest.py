"""Shared fixtures: one real Kafka-protocol broker (Tansu) per test session, on a free loopback port."""

from __future__ import annotations

import time
import uuid
from typing import Callable

import pytest

from streamlearn.stream.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def topics(broker) -> dict[str, str]:
    """Fresh topic names (and their dead-letter topics) for one test, 2 partitions each."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    names = {kind: f"{prefix}-{kind}" for kind in ("inference-logs", "feedback", "examples")}
    broker.create_topics(names.values(), partitions=2)
    broker.create_topics([n + ".dlq" for n in names.values()], partitions=1)
    return names


def wait_for(condition: Callable[[], object], timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Polls until `condition()` is truthy and returns it; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")
