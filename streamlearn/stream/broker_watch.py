"""Says plainly when a Kafka broker cannot be reached: one line per outage, not twenty a second.

When the broker cannot be reached, librdkafka retries by itself and would write a line
to stderr on every attempt (about 20 a second). Its lines go through Python logging
instead (`ClientLog`, each kind at most once a minute), and a `BrokerWatch` says the
outage once, in one line naming the address and what is retried, and again when the
broker answers; `problem()` puts it in words for `/readyz`.

>>> now = [0.0]
>>> watch = BrokerWatch("127.0.0.1:9092", "consumer", clock=lambda: now[0])
>>> watch.failed("Connection refused"); now[0] = 12.0
>>> watch.problem()
'broker 127.0.0.1:9092 unreachable for 12 s (Connection refused; retrying)'
>>> watch.heard(); watch.problem()
''
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

# librdkafka's statistics once a second tell the watch when a broker last sent anything.
STATS_INTERVAL_MS = 1000
# A reconnect within this is no outage (e.g. the broker closed an idle connection): nothing is said.
OUTAGE_GRACE_SECONDS = 2.0
# While an outage lasts, it is said again this often; a client's other lines of one kind, at most this often.
REPEAT_SECONDS = 60.0
# The client's lines that mean "the broker does not answer": the watch's one line stands for them.
_OUTAGE_FACILITIES = {"FAIL": "", "REQTMOUT": "requests time out", "SESSTMOUT": "group heartbeats time out"}


class BrokerWatch:
    """Whether a client's broker answers, told from its errors, logs and statistics; one line per outage.

    An outage starts with a failed connection or a timed-out request and ends as soon as a
    broker sends anything again (the statistics' `rxidle`). The client does the retrying.
    """

    def __init__(self, address: str, retrying: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.retrying = retrying            # what the client keeps retrying, for the log line
        self._clock = clock
        self._heard = clock()               # a new client's start counts as heard: the grace before it connects
        self._down_at: Optional[float] = None
        self._quiet_since = 0.0             # when the broker was last heard, as the outage was noticed
        self._said_at: Optional[float] = None
        self._reason = ""

    def failed(self, reason: str) -> None:
        """A connection failed or a request timed out (`reason`, in a few words)."""
        now = self._clock()
        if self._down_at is None:
            self._down_at, self._quiet_since = now, self._heard
        self._reason = reason or self._reason or "no answer"
        self._say(now)

    def heard(self, seconds_ago: float = 0.0) -> None:
        """A broker sent something `seconds_ago`; it ends an outage noticed before that."""
        now = self._clock()
        self._heard = max(self._heard, now - seconds_ago)
        if self._down_at is not None and self._heard > self._down_at:
            if self._said_at is not None:
                log.info("kafka broker %s answers again after %.0f s; the %s goes on", self.address,
                         now - self._quiet_since, self.retrying)
            self._down_at = self._said_at = None

    def problem(self) -> str:
        """The outage in words ("" when there is none, or it is younger than the grace)."""
        now = self._clock()
        self._say(now)
        if self._down_at is None or now - self._down_at < OUTAGE_GRACE_SECONDS:
            return ""
        return f"broker {self.address} unreachable for {now - self._quiet_since:.0f} s ({self._reason}; retrying)"

    def on_stats(self, text: str) -> None:
        """librdkafka's statistics (`stats_cb`): when a connected broker last sent anything."""
        brokers = json.loads(text).get("brokers", {}).values()
        idle = [b["rxidle"] for b in brokers
                if b.get("source") != "internal" and b.get("state") == "UP" and b.get("rxidle", -1) >= 0]
        if idle:
            self.heard(min(idle) / 1e6)
        else:
            self._say(self._clock())

    def on_error(self, err) -> None:
        """librdkafka's error callback (`error_cb`): connection errors start an outage, others are logged once."""
        from confluent_kafka import KafkaError

        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                          KafkaError._RESOLVE):
            self.failed(_short_reason(err.str()) if err.code() != KafkaError._ALL_BROKERS_DOWN else "")
        else:
            log.warning("kafka %s: %s", self.retrying, err.str())

    def _say(self, now: float) -> None:
        if self._down_at is None or now - self._down_at < OUTAGE_GRACE_SECONDS:
            return
        if self._said_at is None:
            log.warning("kafka broker %s unreachable (%s); the %s keeps retrying", self.address, self._reason,
                        self.retrying)
            self._said_at = now
        elif now - self._said_at >= REPEAT_SECONDS:
            log.warning("kafka broker %s still unreachable after %.0f s (%s); the %s keeps retrying", self.address,
                        now - self._quiet_since, self._reason, self.retrying)
            self._said_at = now


class ClientLog:
    """librdkafka's own log lines through Python logging (`logger`): each kind at most once a minute.

    Lines about failed connections and timeouts feed the `BrokerWatch` instead, whose one
    line stands for them (they stay visible at debug level).
    """

    def __init__(self, watch: BrokerWatch, clock: Callable[[], float] = time.monotonic) -> None:
        self._watch = watch
        self._clock = clock
        self._last: dict[str, float] = {}      # facility -> when its last line was written
        self._held: dict[str, int] = {}        # facility -> lines left out since

    def log(self, level: int, fmt: str, *args) -> None:
        text = fmt % args if args else fmt
        facility = str(args[0]) if args else ""
        if facility in _OUTAGE_FACILITIES:
            self._watch.failed(_OUTAGE_FACILITIES[facility] or _short_reason(text))
            log.debug("kafka client: %s", text)
            return
        now = self._clock()
        if now - self._last.get(facility, -REPEAT_SECONDS) < REPEAT_SECONDS:
            self._held[facility] = self._held.get(facility, 0) + 1
            return
        held = self._held.pop(facility, 0)
        self._last[facility] = now
        log.log(level, "kafka client: %s%s", text, f" ({held} more like it left out)" if held else "")


def client_callbacks(address: str, retrying: str, stats: bool = True) -> tuple[BrokerWatch, dict]:
    """A watch for one confluent-kafka client, and the config entries that route its logs, errors and statistics.

    `stats=False` for a client that is not polled all the time (a producer): its statistics would pile up.
    """
    watch = BrokerWatch(address, retrying)
    callbacks = {"logger": ClientLog(watch), "error_cb": watch.on_error}
    if stats:
        callbacks.update({"stats_cb": watch.on_stats, "statistics.interval.ms": STATS_INTERVAL_MS})
    return watch, callbacks


def _short_reason(text: str) -> str:
    """"...: Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)" -> "Connection refused"."""
    return text.split(" (after", 1)[0].rsplit(": ", 1)[-1].strip()[:120]
