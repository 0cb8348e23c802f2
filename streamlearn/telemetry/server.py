"""The HTTP endpoint on the metrics port: `/metrics`, `/healthz` and `/readyz`.

>>> from prometheus_client import CollectorRegistry
>>> server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0, health=lambda: (True, "ok"), ready=lambda: (False, "starting"))
>>> server.start(); server.port > 0
True
>>> server.stop()
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[bool, str]]


class MetricsServer:
    """Serves Prometheus text format and the two probes on one port, in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, health: Probe, ready: Probe) -> None:
        self._registry = registry
        self._probes = {"/healthz": health, "/readyz": ready}
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server._registry), CONTENT_TYPE_LATEST)
                elif path in server._probes:
                    ok, reason = server._probes[path]()
                    self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes every few seconds must not fill the log
                pass

        return Handler
