"""Shared fixtures: one real Kafka-protocol broker (Tansu) per test session, on a free loopback port."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
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


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH: (status, body); (0, "") while nothing answers on the port yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def own_broker():
    """A broker of this test's own (not the session's), for tests that pause, stop or restart it."""
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def running():
    """Every service process a test starts (with its log file); whatever is still alive at the end is killed,
    and its log's tail printed (pytest shows it when the test failed)."""
    processes: list[tuple[subprocess.Popen, object]] = []
    yield processes
    for process, log in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
        print(f"--- {log.name} (exit {process.returncode}) ---\n{log.read_text()[-4000:]}")
